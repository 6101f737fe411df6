//! Resource tuning's loop: the replica holding the usage lease reads, from Prometheus, the highest CPU and memory of
//! each successful task attempt of a pipeline run once its pod has ended, stores it, and judges the task's resources
//! again from its newest samples ([`tuning::recommend`]). A pipeline with `auto_tune` takes the new resources; either
//! way a changed recommendation is announced (`workflow.task.resources`) for the pipeline's creator.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use cube_kit::ApiError;
use cube_kit::identity::act_for;
use cube_kit::lease::Keeper;
use cube_proto::cube::workflow::v1::{Pipeline, TaskRecommendation, TaskResourcesRecommended};
use http_body_util::{BodyExt as _, Empty};
use hyper::body::Bytes;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use prost::Message as _;
use tonic::Request;

use crate::access::Access;
use crate::launch::{self, Snapshot, template_id};
use crate::model::{pipeline, usage};
use crate::store::{Store, Unsampled};
use crate::tuning::{self, Bounds, NO_RESOURCE_CHECK, SAMPLES, Sample};

/// The topic changed recommendations are announced on.
pub(crate) const RESOURCES_TOPIC: &str = "workflow.task.resources";
/// How often the loop looks for ended tasks to sample.
const TICK: Duration = Duration::from_secs(2);
/// How long after a pod ended its usage is read: a scrape interval for Prometheus to have its last values.
const SETTLE_MS: i64 = 15_000;
/// How old a task's end may be and still be sampled (cube-studio kept 30 days).
const KEEP_MS: i64 = 30 * 24 * 3600 * 1000;
/// The most attempts sampled per tick.
const PER_TICK: u64 = 100;

/// A Prometheus server's HTTP API.
#[derive(Clone)]
pub(crate) struct Prometheus {
    base: String,
    client: Client<HttpConnector, Empty<Bytes>>,
}

impl Prometheus {
    /// The API of the server at `url` (`http://prometheus:9090`).
    pub(crate) fn new(url: &str) -> Self {
        Self {
            base: url.trim_end_matches('/').to_owned(),
            client: Client::builder(TokioExecutor::new()).build_http(),
        }
    }

    /// The highest value `query` took over `[start_ms, end_ms]`, evaluated every `step`; `None` without samples.
    async fn max_over(&self, query: &str, start_ms: i64, end_ms: i64) -> Result<Option<f64>, String> {
        let seconds = |ms: i64| format!("{:.3}", ms as f64 / 1000.0);
        let step = ((end_ms - start_ms) / 250).max(1000);
        let parameters = form_urlencoded::Serializer::new(String::new())
            .append_pair("query", query)
            .append_pair("start", &seconds(start_ms))
            .append_pair("end", &seconds(end_ms))
            .append_pair("step", &seconds(step))
            .finish();
        let uri = format!("{}/api/v1/query_range?{parameters}", self.base);
        let uri: hyper::Uri = uri.parse().map_err(|error| format!("{uri}: {error}"))?;
        let response = self
            .client
            .get(uri)
            .await
            .map_err(|error| format!("asking Prometheus: {error}"))?;
        let status = response.status();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|error| format!("reading Prometheus' answer: {error}"))?
            .to_bytes();
        if !status.is_success() {
            return Err(format!(
                "Prometheus answered {status}: {}",
                String::from_utf8_lossy(&body)
            ));
        }
        let answer: serde_json::Value =
            serde_json::from_slice(&body).map_err(|error| format!("Prometheus' answer is not JSON: {error}"))?;
        let mut most: Option<f64> = None;
        for series in answer["data"]["result"].as_array().into_iter().flatten() {
            for point in series["values"].as_array().into_iter().flatten() {
                if let Some(value) = point[1].as_str().and_then(|text| text.parse::<f64>().ok())
                    && value.is_finite()
                {
                    most = Some(most.map_or(value, |most: f64| most.max(value)));
                }
            }
        }
        Ok(most)
    }

    /// The highest CPU (cores) and memory (bytes) pod `pod` of `namespace` used between `start_ms` and `end_ms`.
    async fn pod_usage(
        &self,
        namespace: &str,
        pod: &str,
        start_ms: i64,
        end_ms: i64,
    ) -> Result<(Option<f64>, Option<f64>), String> {
        let selector = format!("namespace=\"{namespace}\",pod=\"{pod}\",container!=\"\",container!=\"POD\"");
        // `irate`, not cube-studio's `rate(…[1m])`: a rate over a minute divides a ten-second task's CPU seconds by
        // sixty; the rate between the two latest samples measures short and long tasks alike.
        let cpu = format!("sum by (pod) (irate(container_cpu_usage_seconds_total{{{selector}}}[1m]))");
        let memory = format!("sum by (pod) (container_memory_working_set_bytes{{{selector}}})");
        Ok((
            self.max_over(&cpu, start_ms, end_ms).await?,
            self.max_over(&memory, start_ms, end_ms).await?,
        ))
    }
}

/// The usage loop's parts.
pub(crate) struct Usage {
    /// The store.
    pub(crate) store: Store,
    /// Reads projects' quotas.
    pub(crate) access: Access,
    /// Where usage is read.
    pub(crate) prometheus: Prometheus,
    /// The workflow service account's token, with which projects are read for pipelines' creators.
    pub(crate) token: String,
    /// Wakes the outbox relay after an announcement.
    pub(crate) relay: Arc<tokio::sync::Notify>,
}

/// Samples ended tasks while `keeper` holds the usage lease.
pub(crate) async fn run(usage: Arc<Usage>, keeper: Keeper) {
    loop {
        tokio::time::sleep(TICK).await;
        if keeper.current().is_none() {
            continue;
        }
        if let Err(error) = sample(&usage).await {
            tracing::warn!(%error, "sampling task usage");
        }
    }
}

/// Samples what ended and was not sampled yet, then judges the tasks that got samples again.
async fn sample(usage: &Usage) -> Result<(), ApiError> {
    let now = cube_kit::time::now_ms();
    let ended = usage.store.unsampled(now - KEEP_MS, now - SETTLE_MS, PER_TICK).await?;
    let mut judged = BTreeSet::new();
    for Unsampled { run, attempt } in ended {
        let snapshot = Snapshot::decode(&run.snapshot).map_err(ApiError::internal)?;
        let namespace = snapshot
            .placements
            .get(&attempt.task)
            .map(|placement| placement.namespace.clone())
            .unwrap_or_default();
        let (start, end) = (
            attempt.started_ms.unwrap_or(run.created_ms),
            attempt.ended_ms.unwrap_or(now),
        );
        let (cpu, memory) = usage
            .prometheus
            .pod_usage(&namespace, &attempt.workload, start, end)
            .await
            .map_err(|message| ApiError::Unavailable {
                service: "prometheus".to_owned(),
                source: message.into(),
            })?;
        #[expect(
            clippy::cast_possible_truncation,
            reason = "usage far below i64::MAX; NaN and infinities were dropped"
        )]
        usage
            .store
            .insert_usage(usage::Model {
                run: run.id.clone(),
                task: attempt.task.clone(),
                project: run.project.clone(),
                pipeline: run.pipeline.clone(),
                cpu_millis: cpu.map(|cores| (cores * 1000.0).round() as i64),
                memory_bytes: memory.map(|bytes| bytes.round() as i64),
                ended_ms: end,
            })
            .await?;
        judged.insert((run.project, run.pipeline, attempt.task));
    }
    for (project, pipeline, task) in judged {
        // A task renamed or a project gone holds back no other task.
        if let Err(error) = judge(usage, &project, &pipeline, &task).await {
            tracing::warn!(%error, project, pipeline, task, "judging a task's resources");
        }
    }
    Ok(())
}

/// Judges a task's resources again after a new sample: applies them with `auto_tune`, and announces a change (one
/// not applied once, when the sample makes it, not again at every sample after).
async fn judge(usage: &Usage, project: &str, pipeline: &str, task: &str) -> Result<(), ApiError> {
    let Some(row) = usage.store.pipeline(project, pipeline).await? else {
        return Ok(());
    };
    let mut credentials = Request::new(());
    act_for(&mut credentials, &usage.token, &format!("users/{}", row.creator))?;
    let bounds = bounds(&usage.access, &credentials, project).await?;
    let recommendation = recommendation(&usage.store, &row, task, bounds, 0).await?;
    let mut spec = Pipeline::decode(row.spec.as_slice()).map_err(ApiError::internal)?;
    let applied = spec.auto_tune;
    let before = if applied {
        None
    } else {
        Some(self::recommendation(&usage.store, &row, task, bounds, 1).await?)
    };
    if !tuning::news(&recommendation, before.as_ref()) {
        return Ok(());
    }
    let tuned = applied.then(|| {
        for given in spec.tasks.iter_mut().filter(|given| given.name == task) {
            given.cpu.clone_from(&recommendation.cpu);
            given.memory.clone_from(&recommendation.memory);
        }
        let updated = pipeline::Model {
            spec: spec.encode_to_vec(),
            revision: row.revision + 1,
            updated_ms: cube_kit::time::now_ms(),
            ..row.clone()
        };
        (updated, row.revision)
    });
    let event = TaskResourcesRecommended {
        recommendation: Some(recommendation),
        applied,
        owner: format!("users/{}", row.creator),
    };
    match usage.store.announce(RESOURCES_TOPIC, &event, tuned).await {
        Ok(()) => usage.relay.notify_one(),
        // Changed meanwhile: judged again at the task's next sample.
        Err(ApiError::Aborted { message }) => {
            tracing::info!(%message, project, pipeline, task, "the pipeline changed while its resources were tuned");
        }
        Err(error) => return Err(error),
    }
    Ok(())
}

/// What a project's quota bounds a recommendation to, read with `credentials`.
pub(crate) async fn bounds<T>(access: &Access, credentials: &Request<T>, project: &str) -> Result<Bounds, ApiError> {
    let quota = access.project(credentials, project).await?.quota.unwrap_or_default();
    #[expect(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        reason = "a quota's cores are positive and far below u64::MAX"
    )]
    Ok(Bounds {
        cpu_millis: quota.cpu.map(|cores| (cores * 1000.0) as u64),
        memory_bytes: quota.memory_bytes.and_then(|bytes| u64::try_from(bytes).ok()),
    })
}

/// Task `task` of pipeline `row`'s recommendation under `bounds`, or why there is none; from its samples but the
/// newest `older` (0 for the recommendation now, 1 for the one before the newest sample).
pub(crate) async fn recommendation(
    store: &Store,
    row: &pipeline::Model,
    task: &str,
    bounds: Bounds,
    older: u64,
) -> Result<TaskRecommendation, ApiError> {
    let pipeline = crate::pipelines::message(row);
    let given = pipeline
        .tasks
        .iter()
        .find(|given| given.name == task)
        .ok_or_else(|| ApiError::invalid("task", format!("{} has no task {task:?}", pipeline.name)))?;
    let template = store.template(template_id(&given.template)).await?;
    let (cpu, memory) = (
        crate::launch::or_default(&given.cpu, launch::DEFAULT_CPU).to_owned(),
        crate::launch::or_default(&given.memory, launch::DEFAULT_MEMORY).to_owned(),
    );
    let mut answer = TaskRecommendation {
        pipeline: pipeline.name.clone(),
        task: task.to_owned(),
        current_cpu: cpu.clone(),
        current_memory: memory.clone(),
        ..TaskRecommendation::default()
    };
    let unchecked = template
        .as_ref()
        .map(crate::templates::message)
        .is_some_and(|template| template.env.contains_key(NO_RESOURCE_CHECK));
    if unchecked {
        answer.reason = format!("its template {} sets {NO_RESOURCE_CHECK}", given.template);
        return Ok(answer);
    }
    let rows = store
        .usage_of(&row.project, &row.id, task, older, u64::try_from(SAMPLES).unwrap_or(10))
        .await?;
    #[expect(
        clippy::cast_precision_loss,
        clippy::cast_sign_loss,
        reason = "millicores and bytes of one pod"
    )]
    let samples: Vec<Sample> = rows
        .iter()
        .map(|row| Sample {
            cpu_cores: row.cpu_millis.unwrap_or(0) as f64 / 1000.0,
            memory_bytes: row.memory_bytes.unwrap_or(0).max(0) as u64,
        })
        .collect();
    answer.samples = i32::try_from(samples.len()).unwrap_or(i32::MAX);
    answer.max_cpu_used = samples.iter().map(|sample| sample.cpu_cores).fold(0.0, f64::max);
    answer.max_memory_used_bytes = samples
        .iter()
        .map(|sample| i64::try_from(sample.memory_bytes).unwrap_or(i64::MAX))
        .max()
        .unwrap_or(0);
    match tuning::recommend(&cpu, &memory, &samples, bounds) {
        Ok(recommended) => {
            answer.cpu = recommended.cpu;
            answer.memory = recommended.memory;
        }
        Err(reason) => answer.reason = reason,
    }
    Ok(answer)
}
