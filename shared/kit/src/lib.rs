//! The service kit every Cube server is built from: configuration groups, telemetry, the server skeleton with
//! health, reflection, metrics and graceful shutdown, the error type at the API edge, client channels, and
//! connectors for the database and Redis.

pub mod admin;
pub mod channel;
pub mod cli;
pub mod config;
pub mod db;
pub mod dn;
pub mod error;
pub mod health;
pub mod identity;
pub mod lease;
pub mod mask;
pub mod metrics;
pub mod names;
pub mod outbox;
pub mod page;
pub mod redis;
pub mod server;
pub mod shutdown;
pub mod task;
pub mod telemetry;
pub mod time;

pub use channel::Channel;
pub use error::{ApiError, FieldViolation};
pub use health::Health;
pub use identity::Principal;
pub use server::Server;
