//! Volume mounts and whole settings: parsing, checking and rendering.

use std::collections::HashMap;
use std::fmt;
use std::str::FromStr;

use crate::check::{PathRole, check_name, check_path, without_trailing_slash};
use crate::error::{VolumeError, VolumeErrorReason};
use crate::memory::MemorySize;

/// The kinds of volume, as written between the parentheses.
#[derive(Clone, Copy)]
enum Kind {
    Pvc,
    PvcShare,
    Storage,
    HostPath,
    ConfigMap,
    Secret,
    Memory,
}

/// Every kind with its spelling.
const KINDS: [(&str, Kind); 7] = [
    ("pvc", Kind::Pvc),
    ("pvc-share", Kind::PvcShare),
    ("storage", Kind::Storage),
    ("hostpath", Kind::HostPath),
    ("configmap", Kind::ConfigMap),
    ("secret", Kind::Secret),
    ("memory", Kind::Memory),
];

/// Where a mount's data comes from.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum VolumeSource {
    /// A PersistentVolumeClaim mounted per user, `name(pvc):/mnt`.
    ///
    /// In cube-studio each user gets a subdirectory of the claim: the container sees `mountPath=/mnt/<user>` with
    /// `subPath=<user>`, where the user is the creator of the pipeline, notebook or service. Mapping to Kubernetes
    /// objects is left to the services.
    Pvc {
        /// The claim's name.
        claim: String,
    },
    /// A PersistentVolumeClaim shared by everyone, mounted whole (no subPath), `name(pvc-share):/path`.
    PvcShare {
        /// The claim's name.
        claim: String,
    },
    /// A PersistentVolumeClaim of external storage, mounted whole (no subPath), `name(storage):/path`.
    Storage {
        /// The claim's name.
        claim: String,
    },
    /// A directory of the node, `/host/path(hostpath):/path`.
    ///
    /// The syntax accepts any absolute host path, `/` included; which host paths a user may mount is the services'
    /// policy.
    HostPath {
        /// The absolute path on the node, kept as written (a trailing '/' included).
        path: String,
    },
    /// A ConfigMap, `name(configmap):/path`.
    ConfigMap {
        /// The ConfigMap's name.
        name: String,
    },
    /// A Secret, `name(secret):/path`.
    Secret {
        /// The Secret's name.
        name: String,
    },
    /// An `emptyDir` with `medium: Memory` and a size limit, `4G(memory):/dev/shm`.
    Memory {
        /// The size limit.
        size: MemorySize,
    },
}

impl VolumeSource {
    /// Returns the kind as written between the parentheses, e.g. `pvc-share`.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Pvc { .. } => "pvc",
            Self::PvcShare { .. } => "pvc-share",
            Self::Storage { .. } => "storage",
            Self::HostPath { .. } => "hostpath",
            Self::ConfigMap { .. } => "configmap",
            Self::Secret { .. } => "secret",
            Self::Memory { .. } => "memory",
        }
    }

    /// Checks the name or host path; a memory size is valid by construction.
    fn check(&self) -> Result<(), VolumeErrorReason> {
        match self {
            Self::Pvc { claim: name }
            | Self::PvcShare { claim: name }
            | Self::Storage { claim: name }
            | Self::ConfigMap { name }
            | Self::Secret { name } => check_name(name).map_err(|problem| VolumeErrorReason::InvalidName {
                kind: self.kind(),
                name: name.clone(),
                problem,
            }),
            Self::HostPath { path } => {
                check_path(path, PathRole::Host).map_err(|problem| VolumeErrorReason::InvalidHostPath {
                    path: path.clone(),
                    problem,
                })
            }
            Self::Memory { .. } => Ok(()),
        }
    }

    /// Builds the source of kind `kind`, spelled `spelling`, from the text before `(kind)`.
    fn parse(kind: Kind, spelling: &'static str, text: &str) -> Result<Self, VolumeErrorReason> {
        if text.is_empty() {
            return Err(VolumeErrorReason::EmptySource { kind: spelling });
        }
        let owned = text.to_owned();
        let source = match kind {
            Kind::Pvc => Self::Pvc { claim: owned },
            Kind::PvcShare => Self::PvcShare { claim: owned },
            Kind::Storage => Self::Storage { claim: owned },
            Kind::HostPath => Self::HostPath { path: owned },
            Kind::ConfigMap => Self::ConfigMap { name: owned },
            Kind::Secret => Self::Secret { name: owned },
            Kind::Memory => Self::Memory { size: text.parse()? },
        };
        source.check()?;
        Ok(source)
    }
}

/// Renders the volume part of an entry, e.g. `kubeflow-user-workspace(pvc)`.
impl fmt::Display for VolumeSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = self.kind();
        match self {
            Self::Pvc { claim: text }
            | Self::PvcShare { claim: text }
            | Self::Storage { claim: text }
            | Self::HostPath { path: text }
            | Self::ConfigMap { name: text }
            | Self::Secret { name: text } => write!(f, "{text}({kind})"),
            Self::Memory { size } => write!(f, "{size}({kind})"),
        }
    }
}

/// A volume mounted at a path in a container: one entry of a setting, `<source>(<kind>):<mountPath>`.
///
/// The fields are public for matching and building; a value built by hand should be checked with
/// [`VolumeMount::new`], [`VolumeMount::validate`] or [`validate`] before it is rendered, since only valid mounts
/// parse back from their rendering.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct VolumeMount {
    /// Where the data comes from.
    pub source: VolumeSource,
    /// The absolute path in the container, kept as written (a trailing '/' included).
    pub mount_path: String,
}

impl VolumeMount {
    /// Builds a mount and checks it as an entry of a setting would be checked.
    pub fn new(source: VolumeSource, mount_path: impl Into<String>) -> Result<Self, VolumeErrorReason> {
        let mount = Self {
            source,
            mount_path: mount_path.into(),
        };
        mount.validate()?;
        Ok(mount)
    }

    /// Checks the source and mount path as an entry of a setting would be checked.
    pub fn validate(&self) -> Result<(), VolumeErrorReason> {
        self.source.check()?;
        check_mount_path(&self.mount_path)
    }

    /// Returns the mount path without a trailing '/': the directory Kubernetes mounts at, and the form in which two
    /// mounts are compared for clashes (`/mnt` and `/mnt/` clash).
    pub fn normalized_mount_path(&self) -> &str {
        without_trailing_slash(&self.mount_path)
    }
}

/// Renders the entry, e.g. `kubeflow-user-workspace(pvc):/mnt/`.
impl fmt::Display for VolumeMount {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.source, self.mount_path)
    }
}

/// Parses exactly one entry; whitespace around it is ignored, and the error's entry index is 0.
impl FromStr for VolumeMount {
    type Err = VolumeError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let entry = text.trim();
        parse_entry(entry).map_err(|reason| VolumeError::new(0, entry, reason))
    }
}

/// Parses a whole setting, e.g. a project's `volume_mount`: entries separated by ',' or ';'.
///
/// Whitespace around entries is ignored, empty entries (`,,`, a trailing `;`) are skipped, and text that is empty
/// or only whitespace gives an empty list. Two entries may not mount at the same path (`/mnt` and `/mnt/` are the
/// same path). The error names the first offending entry by its position among all pieces between separators,
/// empty ones included.
pub fn parse(text: &str) -> Result<Vec<VolumeMount>, VolumeError> {
    let mut mounts = Vec::new();
    let mut seen = MountPaths::default();
    for (index, piece) in text.split([',', ';']).enumerate() {
        let entry = piece.trim();
        if entry.is_empty() {
            continue;
        }
        let mount = parse_entry(entry).map_err(|reason| VolumeError::new(index, entry, reason))?;
        seen.insert(index, entry, &mount)?;
        mounts.push(mount);
    }
    Ok(mounts)
}

/// Renders a setting: the entries joined with ','; [`parse`] reads valid mounts back unchanged.
pub fn render(mounts: &[VolumeMount]) -> String {
    let mut text = String::new();
    for (index, mount) in mounts.iter().enumerate() {
        if index > 0 {
            text.push(',');
        }
        text.push_str(&mount.to_string());
    }
    text
}

/// Checks a list of mounts built by hand as [`parse`] would check it: each mount, then that no two share a path.
///
/// The error's entry index is the position in `mounts`, and its entry text is the mount rendered.
pub fn validate(mounts: &[VolumeMount]) -> Result<(), VolumeError> {
    let mut seen = MountPaths::default();
    for (index, mount) in mounts.iter().enumerate() {
        let entry = mount.to_string();
        mount
            .validate()
            .map_err(|reason| VolumeError::new(index, &entry, reason))?;
        seen.insert(index, &entry, mount)?;
    }
    Ok(())
}

/// The mount paths of a setting so far, to find two entries mounting at the same path.
#[derive(Default)]
struct MountPaths {
    /// Normalised mount path → index and text of the entry that mounts there.
    first: HashMap<String, (usize, String)>,
}

impl MountPaths {
    /// Records `mount`, or fails if an earlier entry mounts at the same path.
    fn insert(&mut self, index: usize, entry: &str, mount: &VolumeMount) -> Result<(), VolumeError> {
        let key = mount.normalized_mount_path();
        if let Some((first_index, first_entry)) = self.first.get(key) {
            let reason = VolumeErrorReason::DuplicateMountPath {
                mount_path: mount.mount_path.clone(),
                first_index: *first_index,
                first_entry: first_entry.clone(),
            };
            return Err(VolumeError::new(index, entry, reason));
        }
        self.first.insert(key.to_owned(), (index, entry.to_owned()));
        Ok(())
    }
}

/// Checks a mount path.
fn check_mount_path(path: &str) -> Result<(), VolumeErrorReason> {
    check_path(path, PathRole::Mount).map_err(|problem| VolumeErrorReason::InvalidMountPath {
        path: path.to_owned(),
        problem,
    })
}

/// Parses one entry, already trimmed.
fn parse_entry(entry: &str) -> Result<VolumeMount, VolumeErrorReason> {
    if entry.is_empty() {
        return Err(VolumeErrorReason::Empty);
    }
    for (at, character) in entry.char_indices() {
        if character == ',' || character == ';' {
            return Err(VolumeErrorReason::Separator { separator: character });
        }
        if character.is_control() {
            return Err(VolumeErrorReason::ControlCharacter { character, at });
        }
        if character.is_whitespace() {
            return Err(VolumeErrorReason::Whitespace { at });
        }
    }
    let Some((volume, mount_path)) = entry.split_once(':') else {
        return Err(VolumeErrorReason::MissingColon);
    };
    if mount_path.contains(':') {
        return Err(VolumeErrorReason::ExtraColon {
            count: entry.matches(':').count(),
        });
    }
    let (source_text, spelling, kind) = split_kind(volume)?;
    let source = VolumeSource::parse(kind, spelling, source_text)?;
    check_mount_path(mount_path)?;
    Ok(VolumeMount {
        source,
        mount_path: mount_path.to_owned(),
    })
}

/// Splits the volume part `source(kind)` at its last '(' and checks the kind.
fn split_kind(volume: &str) -> Result<(&str, &'static str, Kind), VolumeErrorReason> {
    let Some(inner) = volume.strip_suffix(')') else {
        if let Some(close) = volume.rfind(')') {
            let text = volume.get(close + 1..).unwrap_or_default().to_owned();
            return Err(VolumeErrorReason::TextAfterKind { text });
        }
        if volume.contains('(') {
            return Err(VolumeErrorReason::UnclosedKind);
        }
        return Err(VolumeErrorReason::MissingKind);
    };
    let Some((source, written)) = inner.rsplit_once('(') else {
        return Err(VolumeErrorReason::MissingKind);
    };
    match KINDS.iter().find(|(spelling, _)| *spelling == written) {
        Some(&(spelling, kind)) => Ok((source, spelling, kind)),
        None => {
            let guess = written.to_ascii_lowercase().replace('_', "-");
            let suggestion = KINDS
                .iter()
                .find(|(spelling, _)| *spelling == guess)
                .map(|&(spelling, _)| spelling);
            Err(VolumeErrorReason::UnknownKind {
                kind: written.to_owned(),
                suggestion,
            })
        }
    }
}
