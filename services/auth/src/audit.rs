//! `cube.auth.v1.AuditService`: the audit log, for admins.

use std::sync::Arc;

use cube_kit::ApiError;
use cube_kit::Principal;
use cube_kit::page::{decode_token, finish_page, page_size, parse_filter};
use cube_proto::cube::auth::v1::audit_service_server::AuditService;
use cube_proto::cube::auth::v1::{AuditEvent, ListAuditEventsRequest, ListAuditEventsResponse};
use sea_orm::{ColumnTrait as _, EntityTrait as _, QueryFilter as _, QueryOrder as _, QuerySelect as _};
use tonic::{Request, Response, Status};

use crate::core::{Core, db_error, require_admin, status, timestamp};
use crate::model::audit_event;

/// Serves `AuditService`.
#[derive(Clone)]
pub(crate) struct AuditLog(pub(crate) Arc<Core>);

impl AuditLog {
    async fn list(&self, request: Request<ListAuditEventsRequest>) -> Result<ListAuditEventsResponse, ApiError> {
        let caller = Principal::of(&request)?;
        require_admin(&caller, "auditEvents.list")?;
        let request = request.into_inner();
        let size = page_size(request.page_size)?;
        let before: Option<i64> = decode_token(&request.page_token)?;
        let mut query = audit_event::Entity::find().order_by_desc(audit_event::Column::Id);
        for condition in parse_filter(&request.filter, &["actor", "action", "target", "success"])? {
            query = match condition.field.as_str() {
                "actor" => query.filter(audit_event::Column::Actor.eq(condition.value.to_ascii_lowercase())),
                "action" => query.filter(audit_event::Column::Action.eq(condition.value)),
                "target" => query.filter(audit_event::Column::Target.eq(condition.value)),
                _ => match condition.value.as_str() {
                    "true" => query.filter(audit_event::Column::Success.eq(true)),
                    "false" => query.filter(audit_event::Column::Success.eq(false)),
                    other => {
                        return Err(ApiError::invalid(
                            "filter",
                            format!("success accepts true or false, got {other:?}"),
                        ));
                    }
                },
            };
        }
        if let Some(before) = before {
            query = query.filter(audit_event::Column::Id.lt(before));
        }
        let mut rows = query.limit(size + 1).all(&self.0.db).await.map_err(db_error)?;
        let next_page_token = finish_page(&mut rows, size, |row| row.id);
        Ok(ListAuditEventsResponse {
            audit_events: rows
                .into_iter()
                .map(|row| AuditEvent {
                    name: format!("auditEvents/{}", row.id),
                    time: Some(timestamp(row.time_ms)),
                    actor: row.actor,
                    action: row.action,
                    target: row.target,
                    success: row.success,
                    client_address: row.client_address,
                    detail: row.detail,
                })
                .collect(),
            next_page_token,
        })
    }
}

#[tonic::async_trait]
impl AuditService for AuditLog {
    async fn list_audit_events(
        &self,
        request: Request<ListAuditEventsRequest>,
    ) -> Result<Response<ListAuditEventsResponse>, Status> {
        self.list(request).await.map(Response::new).map_err(status)
    }
}
