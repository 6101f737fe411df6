//! Volume mounts in cube-studio's syntax (`name(pvc):/mnt`, `4G(memory):/dev/shm`, …): parsed into typed values,
//! checked, and rendered back byte for byte, so settings written for cube-studio paste in unchanged.
//!
//! A setting is a list of entries separated by ',' or ';'; each entry is `<source>(<kind>):<mountPath>`:
//!
//! | Entry | Source |
//! |---|---|
//! | `name(pvc):/mnt` | [`VolumeSource::Pvc`], a claim mounted per user (cube-studio: `/mnt/<user>`, subPath `<user>`) |
//! | `name(pvc-share):/path` | [`VolumeSource::PvcShare`], a claim mounted whole |
//! | `name(storage):/path` | [`VolumeSource::Storage`], a claim of external storage mounted whole |
//! | `/host/path(hostpath):/path` | [`VolumeSource::HostPath`], a directory of the node |
//! | `name(configmap):/path` | [`VolumeSource::ConfigMap`] |
//! | `name(secret):/path` | [`VolumeSource::Secret`] |
//! | `4G(memory):/dev/shm` | [`VolumeSource::Memory`], an `emptyDir` in memory with a size limit |
//!
//! The syntax is cube-studio's, made strict where cube-studio was sloppy:
//! - Kinds are lowercase exactly. Claim, ConfigMap and Secret names must be valid Kubernetes names (DNS-1123
//!   subdomains); cube-studio accepted `_` and uppercase and only rewrote them in the generated volume name, so a
//!   claim named that way cannot exist.
//! - Paths are absolute and contain no ':' (cube-studio splits entries on it), no whitespace, no control
//!   characters, no ',' or ';', no empty segment (`//`) and no `.` or `..` segment, and are at most 4096 bytes.
//!   Nothing is normalised: a single trailing '/' is accepted and kept (cube-studio's own default is
//!   `kubeflow-user-workspace(pvc):/mnt/`), so every accepted entry renders back exactly.
//! - A mount path is never `/`; a host path may be (whether it may be mounted is the services' policy), and may
//!   not contain '(' or ')', which enclose the kind.
//! - Memory sizes are a whole number above 0 without leading zeros, with unit K, M, G, T, Ki, Mi, Gi or Ti, all
//!   binary as in cube-studio (`4G` became `sizeLimit: 4Gi`).
//! - Whitespace is allowed around entries only; empty entries are skipped.
//! - Two entries may not mount at the same path; `/mnt` and `/mnt/` are the same path.
//!
//! For every text `t` that [`parse`] accepts, [`render`] gives `t` back with the separators written as ',' and the
//! whitespace and empty entries dropped; for every valid list of mounts `m`, `parse(&render(&m)) == Ok(m)`.

mod check;
mod error;
mod memory;
mod mount;

pub use error::{ACCEPTED_FORMS, MemorySizeProblem, NameProblem, PathProblem, VolumeError, VolumeErrorReason};
pub use memory::MemorySize;
pub use mount::{VolumeMount, VolumeSource, parse, render, validate};
