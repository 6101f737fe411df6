//! `cube.watcher.v1.EventService`: the history of events, a page at a time, and live streams of them that resume
//! from an event id. Every answer is narrowed to what the caller may see (see [`crate::filter::query`]).

use std::sync::Arc;
use std::time::Duration;

use cube_kit::ApiError;
use cube_kit::identity::Principal;
use cube_kit::page::{decode_token, finish_page, page_size};
use cube_proto::cube::watcher::v1::event_service_server::EventService;
use cube_proto::cube::watcher::v1::{Event, ListEventsRequest, ListEventsResponse, WatchEventsRequest};
use sea_orm::DatabaseConnection;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::metadata::MetadataMap;
use tonic::{Request, Response, Status};

use crate::DOMAIN;
use crate::access::Access;
use crate::filter::{self, Filter};
use crate::live::Live;
use crate::store::{self, EventQuery, StoreError};

/// How many events a stream reads from the history at a time.
const BATCH: u64 = 500;
/// How often a stream looks at the history even when told of nothing new (should the bus be slow).
const LOOK_ANYWAY: Duration = Duration::from_secs(2);
/// How often a stream asks again which projects its caller belongs to (and whether their credentials still hold),
/// besides each time projects announces a membership change.
const RECHECK: Duration = Duration::from_secs(30);
/// How many events a stream holds for a slow client before it stops reading.
const BUFFER: usize = 256;

/// The event API over the watcher's store.
#[derive(Debug, Clone)]
pub(crate) struct Events {
    pub(crate) db: DatabaseConnection,
    pub(crate) access: Access,
    pub(crate) live: Arc<Live>,
}

fn stored(error: StoreError) -> ApiError {
    ApiError::internal(error)
}

impl Events {
    async fn query(&self, metadata: &MetadataMap, caller: &Principal, filter: Filter) -> Result<EventQuery, ApiError> {
        let reader = self.access.reader(metadata, caller).await?;
        filter::query(filter, &reader)
    }

    async fn list(&self, request: Request<ListEventsRequest>) -> Result<ListEventsResponse, ApiError> {
        let caller = Principal::of(&request)?;
        let metadata = request.metadata().clone();
        let request = request.into_inner();
        let size = page_size(request.page_size)?;
        let filter = filter::parse(&request.filter)?;
        let after: i64 = decode_token(&request.page_token)?.unwrap_or(0);
        let query = self.query(&metadata, &caller, filter).await?;
        let mut rows = store::events(&self.db, &query, after, size + 1).await.map_err(stored)?;
        let next_page_token = finish_page(&mut rows, size, |(id, _)| *id);
        Ok(ListEventsResponse {
            events: rows.into_iter().map(|(_, event)| event).collect(),
            next_page_token,
        })
    }

    /// Checks a watch and returns where it starts: after `resume_after`, or after the newest event.
    async fn start(&self, resume_after: &str) -> Result<i64, ApiError> {
        let last = store::last_event_id(&self.db).await.map_err(stored)?;
        if resume_after.is_empty() {
            return Ok(last);
        }
        let id = filter::event_id("resume_after", resume_after)?;
        if id > last {
            return Err(ApiError::invalid(
                "resume_after",
                format!("{resume_after} has not been recorded; the newest event is events/{last}"),
            ));
        }
        let first = store::first_event_id(&self.db)
            .await
            .map_err(stored)?
            .unwrap_or(last + 1);
        if id + 1 < first {
            return Err(ApiError::OutOfRange {
                field: "resume_after",
                message: format!(
                    "the events after {resume_after} are no longer kept (the oldest is events/{first}); list the \
                     events to catch up, then watch"
                ),
            });
        }
        Ok(id)
    }

    async fn watch(
        &self,
        request: Request<WatchEventsRequest>,
    ) -> Result<ReceiverStream<Result<Event, Status>>, ApiError> {
        let caller = Principal::of(&request)?;
        let metadata = request.metadata().clone();
        let request = request.into_inner();
        let filter = filter::parse(&request.filter)?;
        let query = self.query(&metadata, &caller, filter.clone()).await?;
        let cursor = self.start(&request.resume_after).await?;
        let (sender, receiver) = mpsc::channel(BUFFER);
        let stream = Stream {
            events: self.clone(),
            metadata,
            caller,
            filter,
            query,
            cursor,
            sender,
        };
        tokio::spawn(stream.run());
        Ok(ReceiverStream::new(receiver))
    }
}

/// One open `WatchEvents`.
struct Stream {
    events: Events,
    metadata: MetadataMap,
    caller: Arc<Principal>,
    filter: Filter,
    query: EventQuery,
    /// The id of the last event looked at.
    cursor: i64,
    sender: mpsc::Sender<Result<Event, Status>>,
}

impl Stream {
    /// Sends what the history holds after the cursor, then waits for news, until the client leaves or the caller
    /// may no longer read (the stream then ends with the reason).
    async fn run(mut self) {
        let mut news = self.events.live.news();
        let mut memberships = self.events.live.memberships();
        let mut recheck = tokio::time::interval_at(tokio::time::Instant::now() + RECHECK, RECHECK);
        loop {
            news.borrow_and_update();
            let rows = match store::events(&self.events.db, &self.query, self.cursor, BATCH).await {
                Ok(rows) => rows,
                Err(error) => return self.end(stored(error)).await,
            };
            let full = rows.len() as u64 == BATCH;
            for (id, event) in rows {
                self.cursor = id;
                if self.sender.send(Ok(event)).await.is_err() {
                    return;
                }
            }
            if full {
                continue;
            }
            let recheck_now = tokio::select! {
                () = self.sender.closed() => return,
                _ = news.changed() => false,
                () = tokio::time::sleep(LOOK_ANYWAY) => false,
                _ = memberships.changed() => true,
                _ = recheck.tick() => true,
            };
            if recheck_now {
                memberships.borrow_and_update();
                match self
                    .events
                    .query(&self.metadata, &self.caller, self.filter.clone())
                    .await
                {
                    Ok(query) => self.query = query,
                    Err(error) => return self.end(error).await,
                }
            }
        }
    }

    async fn end(self, error: ApiError) {
        tracing::info!(%error, caller = %self.caller.username, "ending an event stream");
        let _ = self.sender.send(Err(error.status(DOMAIN))).await;
    }
}

#[tonic::async_trait]
impl EventService for Events {
    async fn list_events(&self, request: Request<ListEventsRequest>) -> Result<Response<ListEventsResponse>, Status> {
        self.list(request)
            .await
            .map(Response::new)
            .map_err(|error| error.status(DOMAIN))
    }

    type WatchEventsStream = ReceiverStream<Result<Event, Status>>;

    async fn watch_events(
        &self,
        request: Request<WatchEventsRequest>,
    ) -> Result<Response<Self::WatchEventsStream>, Status> {
        self.watch(request)
            .await
            .map(Response::new)
            .map_err(|error| error.status(DOMAIN))
    }
}
