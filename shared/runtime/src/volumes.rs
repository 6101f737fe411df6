//! Renders a workload's volume mounts (cube-studio's syntax, typed as [`cube_volumes::VolumeMount`]) to Kubernetes
//! `Volume`s and `VolumeMount`s with cube-studio's rules (`py_k8s.get_volume_mounts`):
//!
//! | Entry | Volume | Mount |
//! |---|---|---|
//! | `name(pvc):/mnt` | claim `name` | `/mnt/<user>`, subPath `<user>` (each user sees a directory of their own) |
//! | `name(pvc-share):/p`, `name(storage):/p` | claim `name` | `/p`, the whole claim |
//! | `/host/path(hostpath):/p` | hostPath `/host/path`, named after the path | `/p` |
//! | `name(configmap):/p`, `name(secret):/p` | ConfigMap, Secret `name` | `/p` |
//! | `4G(memory):/p` | `emptyDir{medium: Memory, sizeLimit: 4Gi}`, named `memory-4` | `/p` |
//! | (implicit) | `emptyDir{medium: Memory}` named `dshm` | `/dev/shm`, unless a mount is there already |
//!
//! Volume names are DNS-1123 labels made as cube-studio made them (lower-cased, every character other than a
//! letter or digit as `-`, the last 60 characters, no `-` at either end), and made unique with a `-2`, `-3`, ...
//! suffix when two mounts would get the same name.
//!
//! cube-studio also mounted the node's `/usr/share/zoneinfo/Asia/Shanghai` at `/etc/localtime` in every pod. Cube
//! does not: a time zone is not the platform's business (images and users choose their own through `TZ`), and a
//! hostPath to one city's zone file ties every workload to how the nodes were installed.

use std::collections::HashSet;

use cube_volumes::VolumeSource;
use k8s_openapi::api::core::v1::{
    ConfigMapVolumeSource, EmptyDirVolumeSource, HostPathVolumeSource, PersistentVolumeClaimVolumeSource,
    SecretVolumeSource, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;

use crate::error::RuntimeError;

/// Where the implicit in-memory volume is mounted: shared memory, which many ML frameworks need more of than a
/// container runtime's default 64 MiB.
pub const SHM_PATH: &str = "/dev/shm";

/// The name of the implicit in-memory volume at [`SHM_PATH`].
pub const SHM_VOLUME: &str = "dshm";

/// The longest volume name cube-studio made; Kubernetes allows 63 characters, which leaves room for a suffix.
const NAME_CHARS: usize = 60;

/// The longest a user's directory name may be once escaped: the longest file name most file systems take.
const USER_DIRECTORY_BYTES: usize = 255;

/// The pod volumes and the container mounts of a workload's volume mounts; every container mounts all of them.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Rendered {
    /// The pod's volumes, one per mount, in the order of the mounts, the implicit `/dev/shm` last.
    pub volumes: Vec<Volume>,
    /// The containers' mounts, in the same order as [`Rendered::volumes`].
    pub mounts: Vec<VolumeMount>,
}

/// Renders `mounts` for a workload of `user` (the creator of the pipeline, notebook or service, whose directory of
/// each per-user claim it mounts).
///
/// Fails with [`RuntimeError::Invalid`] naming `volumes` when the mounts are not valid as a setting (see
/// [`cube_volumes::validate`]), and naming `user` when a per-user claim is mounted and `user` is empty or too long.
/// A user name that is not a plain file name is escaped for the directory (see [`user_directory`]).
pub fn render(mounts: &[cube_volumes::VolumeMount], user: &str) -> Result<Rendered, RuntimeError> {
    cube_volumes::validate(mounts).map_err(|error| RuntimeError::Invalid {
        field: "volumes".to_owned(),
        message: error.to_string(),
    })?;
    let mut names = Names::default();
    let mut rendered = Rendered::default();
    for mount in mounts {
        let path = mount.normalized_mount_path();
        let (name, source, mount_path, sub_path) = match &mount.source {
            VolumeSource::Pvc { claim } => {
                let directory = user_directory(user)?;
                let mount_path = format!("{path}/{directory}");
                (dns_label(claim), claim_source(claim), mount_path, Some(directory))
            }
            VolumeSource::PvcShare { claim } | VolumeSource::Storage { claim } => {
                (dns_label(claim), claim_source(claim), path.to_owned(), None)
            }
            VolumeSource::HostPath { path: host } => {
                let source = Volume {
                    host_path: Some(HostPathVolumeSource {
                        path: host.clone(),
                        type_: None,
                    }),
                    ..Volume::default()
                };
                (dns_label(host), source, path.to_owned(), None)
            }
            VolumeSource::ConfigMap { name } => {
                let source = Volume {
                    config_map: Some(ConfigMapVolumeSource {
                        name: name.clone(),
                        ..ConfigMapVolumeSource::default()
                    }),
                    ..Volume::default()
                };
                (dns_label(name), source, path.to_owned(), None)
            }
            VolumeSource::Secret { name } => {
                let source = Volume {
                    secret: Some(SecretVolumeSource {
                        secret_name: Some(name.clone()),
                        ..SecretVolumeSource::default()
                    }),
                    ..Volume::default()
                };
                (dns_label(name), source, path.to_owned(), None)
            }
            VolumeSource::Memory { size } => (
                memory_name(size.as_str()),
                memory_source(Some(size.quantity())),
                path.to_owned(),
                None,
            ),
        };
        let name = names.unique(&name, mount.source.kind());
        rendered.push(name, source, mount_path, sub_path);
    }
    if !mounts.iter().any(|mount| mount.normalized_mount_path() == SHM_PATH) {
        let name = names.unique(SHM_VOLUME, SHM_VOLUME);
        rendered.push(name, memory_source(None), SHM_PATH.to_owned(), None);
    }
    Ok(rendered)
}

impl Rendered {
    /// Adds a volume named `name` (its source taken from `source`) and its mount.
    fn push(&mut self, name: String, source: Volume, mount_path: String, sub_path: Option<String>) {
        self.mounts.push(VolumeMount {
            name: name.clone(),
            mount_path,
            sub_path,
            ..VolumeMount::default()
        });
        self.volumes.push(Volume { name, ..source });
    }
}

/// The directory of a per-user claim that `user` mounts: the user name itself when it is a plain file name (ASCII
/// letters, digits, `-`, `_`, and `.` other than first), otherwise escaped with each other byte as `~xx` (hex), so
/// that two different users never share a directory and no name reaches outside the claim (`..`, `a/b`).
///
/// Fails with [`RuntimeError::Invalid`] naming `user` when it is empty or longer than a file name can be.
pub fn user_directory(user: &str) -> Result<String, RuntimeError> {
    let invalid = |message: String| RuntimeError::Invalid {
        field: "user".to_owned(),
        message,
    };
    if user.is_empty() {
        return Err(invalid(
            "is empty; a per-user claim (name(pvc):/mnt) mounts the directory of the workload's creator, e.g. alice"
                .to_owned(),
        ));
    }
    let mut directory = String::with_capacity(user.len());
    for (at, character) in user.char_indices() {
        let plain = character.is_ascii_alphanumeric() || matches!(character, '-' | '_') || (character == '.' && at > 0);
        if plain {
            directory.push(character);
        } else {
            let mut bytes = [0; 4];
            for byte in character.encode_utf8(&mut bytes).bytes() {
                directory.push_str(&format!("~{byte:02x}"));
            }
        }
    }
    if directory.len() > USER_DIRECTORY_BYTES {
        return Err(invalid(format!(
            "{user:?} makes a directory name of {} bytes; at most {USER_DIRECTORY_BYTES} are accepted",
            directory.len()
        )));
    }
    Ok(directory)
}

/// A volume name from `text` as cube-studio made it: lower-cased, every character other than an ASCII letter or
/// digit as `-`, the last 60 characters, without `-` at either end. Empty when nothing of `text` is left.
pub fn dns_label(text: &str) -> String {
    let mapped: Vec<char> = text
        .chars()
        .map(|character| {
            let lower = character.to_ascii_lowercase();
            if lower.is_ascii_lowercase() || lower.is_ascii_digit() {
                lower
            } else {
                '-'
            }
        })
        .collect();
    let tail = mapped
        .get(mapped.len().saturating_sub(NAME_CHARS)..)
        .unwrap_or_default();
    tail.iter().collect::<String>().trim_matches('-').to_owned()
}

/// The volume name of a memory volume of `size`: `memory-4` for cube-studio's `4G`, `memory-512mi` for `512Mi`.
fn memory_name(size: &str) -> String {
    let size = size.strip_suffix('G').unwrap_or(size);
    dns_label(&format!("memory-{size}"))
}

/// A volume (without its name) of the claim `claim`.
fn claim_source(claim: &str) -> Volume {
    Volume {
        persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
            claim_name: claim.to_owned(),
            read_only: None,
        }),
        ..Volume::default()
    }
}

/// A volume (without its name) in memory, of at most `size_limit` when given.
fn memory_source(size_limit: Option<String>) -> Volume {
    Volume {
        empty_dir: Some(EmptyDirVolumeSource {
            medium: Some("Memory".to_owned()),
            size_limit: size_limit.map(Quantity),
        }),
        ..Volume::default()
    }
}

/// The volume names of one pod so far.
#[derive(Default)]
struct Names {
    used: HashSet<String>,
}

impl Names {
    /// `base` (or `fallback` when `base` is empty) if no volume has that name yet, otherwise it with the first of
    /// `-2`, `-3`, ... that makes it unique, cut so that the whole stays a valid label.
    fn unique(&mut self, base: &str, fallback: &str) -> String {
        let base = if base.is_empty() { fallback } else { base };
        let mut candidate = base.to_owned();
        let mut counter = 1_usize;
        while self.used.contains(&candidate) {
            counter += 1;
            let suffix = format!("-{counter}");
            let keep = base.len().min(63 - suffix.len());
            let stem = base.get(..keep).unwrap_or(base).trim_end_matches('-');
            candidate = format!("{stem}{suffix}");
        }
        self.used.insert(candidate.clone());
        candidate
    }
}
