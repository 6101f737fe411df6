//! The revocations in force, stored with the change that made them, so that every service's verifier can load
//! them before it answers after a start (`AuthService.GetRevocationList`): a restart never revives a revoked
//! credential, whatever the event bus kept.

use cube_kit::ApiError;
use cube_kit::identity::{Revocation, RevokedCredential, RevokedSubject, digest_from_hex, digest_hex, unix_now};
use cube_proto::cube::auth::v1::RevocationList;
use sea_orm::{ColumnTrait as _, ConnectionTrait, EntityTrait as _, QueryFilter as _, Set};

use crate::core::db_error;
use crate::model::revocation;

fn subject_name(subject: RevokedSubject) -> &'static str {
    match subject {
        RevokedSubject::Session => "session",
        RevokedSubject::ApiToken => "api_token",
        RevokedSubject::User => "user",
        RevokedSubject::UserAccessTokens => "user_access_tokens",
    }
}

fn subject_of(name: &str) -> Option<RevokedSubject> {
    [
        RevokedSubject::Session,
        RevokedSubject::ApiToken,
        RevokedSubject::User,
        RevokedSubject::UserAccessTokens,
    ]
    .into_iter()
    .find(|subject| subject_name(*subject) == name)
}

/// Stores `revocations` in `db`'s transaction, and forgets those that no longer matter.
///
/// # Errors
/// Returns an internal error when the database fails.
pub(crate) async fn record(db: &impl ConnectionTrait, revocations: &[Revocation]) -> Result<(), ApiError> {
    if revocations.is_empty() {
        return Ok(());
    }
    revocation::Entity::delete_many()
        .filter(revocation::Column::ForgetAfter.lte(unix_now()))
        .exec(db)
        .await
        .map_err(db_error)?;
    let rows = revocations.iter().map(|revocation| {
        let credential = revocation.credential();
        revocation::ActiveModel {
            subject: Set(subject_name(credential.subject).to_owned()),
            subject_sha256: Set(digest_hex(&credential.digest)),
            issued_until: Set(credential.issued_until),
            forget_after: Set(credential.forget_after),
            ..Default::default()
        }
    });
    revocation::Entity::insert_many(rows).exec(db).await.map_err(db_error)?;
    Ok(())
}

/// Returns the revocations in force.
///
/// # Errors
/// Returns an internal error when the database fails.
pub(crate) async fn in_force(db: &impl ConnectionTrait) -> Result<Vec<RevokedCredential>, ApiError> {
    let rows = revocation::Entity::find()
        .filter(revocation::Column::ForgetAfter.gt(unix_now()))
        .all(db)
        .await
        .map_err(db_error)?;
    Ok(rows
        .iter()
        .filter_map(|row| {
            Some(RevokedCredential {
                subject: subject_of(&row.subject)?,
                digest: digest_from_hex(&row.subject_sha256)?,
                issued_until: row.issued_until,
                forget_after: row.forget_after,
            })
        })
        .collect())
}

/// Answers `GetRevocationList`.
///
/// # Errors
/// Returns an internal error when the database fails.
pub(crate) async fn list(db: &impl ConnectionTrait) -> Result<RevocationList, ApiError> {
    Ok(RevocationList {
        revocations: in_force(db).await?.iter().map(RevokedCredential::to_proto).collect(),
    })
}
