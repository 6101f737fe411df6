//! What can be wrong with a volume mount setting, in messages that say what is wrong and what is accepted.

/// Lists the forms an entry may take; every [`VolumeError`] message ends with it.
pub const ACCEPTED_FORMS: &str = "name(pvc):/mnt, name(pvc-share):/path, name(storage):/path, \
     /host/path(hostpath):/path, name(configmap):/path, name(secret):/path, 4G(memory):/dev/shm \
     (entries separated by ',' or ';')";

/// Longest piece of user text quoted in a message, in characters; the rest is elided.
const QUOTED_CHARS: usize = 100;

/// Rule for Kubernetes object names, appended to every name error.
const NAME_RULE: &str = "Kubernetes names (DNS-1123 subdomains) are lowercase letters, digits, '-' and '.', \
     start and end with a letter or digit, and are at most 253 characters long, e.g. my-claim";

/// Rule for paths, appended to every path error.
const PATH_RULE: &str = "paths are absolute, e.g. /mnt/data, at most 4096 bytes, without ':', ',', ';', whitespace, \
     '//', or '.' and '..' segments";

/// Rule for memory sizes, appended to every memory size error.
const MEMORY_RULE: &str = "sizes are a whole number above 0 followed by K, M, G, T, Ki, Mi, Gi or Ti, e.g. 4G or \
     512Mi (as in cube-studio, K, M, G and T are binary: 4G is 4Gi)";

/// Quotes user text for a message: escaped like a Rust string, and cut after [`QUOTED_CHARS`] characters.
pub(crate) fn quote(text: &str) -> String {
    match text.char_indices().nth(QUOTED_CHARS) {
        None => format!("{text:?}"),
        Some((cut, _)) => format!("{:?}… ({} bytes)", text.get(..cut).unwrap_or_default(), text.len()),
    }
}

/// Describes which object a name belongs to, for messages.
fn name_label(kind: &str) -> &'static str {
    match kind {
        "configmap" => "ConfigMap name",
        "secret" => "Secret name",
        _ => "PersistentVolumeClaim name",
    }
}

/// Formats an optional "did you mean" hint.
fn did_you_mean(suggestion: &Option<String>) -> String {
    match suggestion {
        Some(name) => format!(" (did you mean {name:?})"),
        None => String::new(),
    }
}

/// Formats an optional kind hint.
fn kind_hint(suggestion: &Option<&'static str>) -> String {
    match suggestion {
        Some(kind) => format!(" (did you mean {kind:?}? kinds are lowercase and use '-')"),
        None => String::new(),
    }
}

/// Reports one invalid entry of a volume mount setting: where it is, its text, and why it was refused.
///
/// Its message names the entry, gives the reason and lists the accepted forms ([`ACCEPTED_FORMS`]), so it can be
/// shown to a user as it is, e.g. as the description of a gRPC field violation.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid volume mount entry {index} {} (counting from 0): {reason}; accepted forms: {}",
    quote(.entry),
    ACCEPTED_FORMS
)]
pub struct VolumeError {
    index: usize,
    entry: String,
    reason: VolumeErrorReason,
}

impl VolumeError {
    /// Builds the error for entry `index`, whose text (without surrounding whitespace) is `entry`.
    pub(crate) fn new(index: usize, entry: &str, reason: VolumeErrorReason) -> Self {
        Self {
            index,
            entry: entry.to_owned(),
            reason,
        }
    }

    /// Returns the position of the offending entry, counting from 0.
    ///
    /// For [`parse`](crate::parse) it counts every piece between separators, empty ones included, so it points
    /// into the text as the user wrote it; for [`validate`](crate::validate) it is the index in the slice; for
    /// [`VolumeMount::from_str`](std::str::FromStr::from_str) it is 0.
    pub fn entry_index(&self) -> usize {
        self.index
    }

    /// Returns the offending entry's full text, without surrounding whitespace.
    pub fn entry(&self) -> &str {
        &self.entry
    }

    /// Returns why the entry was refused.
    pub fn reason(&self) -> &VolumeErrorReason {
        &self.reason
    }
}

/// Explains why one entry (or one programmatically built [`VolumeMount`](crate::VolumeMount)) was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum VolumeErrorReason {
    /// The entry is empty (only [`VolumeMount::from_str`](std::str::FromStr::from_str) sees this; a setting skips
    /// empty entries).
    #[error("the entry is empty")]
    Empty,
    /// A single entry contains a separator.
    #[error("the entry contains {separator:?}, which separates entries; give one entry at a time")]
    Separator {
        /// The separator found, ',' or ';'.
        separator: char,
    },
    /// The entry contains a control character.
    #[error("the entry contains the control character {character:?} at byte {at}")]
    ControlCharacter {
        /// The character found.
        character: char,
        /// Its byte offset in the entry.
        at: usize,
    },
    /// The entry contains whitespace inside it.
    #[error("the entry contains whitespace at byte {at}; whitespace is allowed only around entries")]
    Whitespace {
        /// The byte offset of the whitespace in the entry.
        at: usize,
    },
    /// There is no ':' between the volume and the mount path.
    #[error("there is no ':' between the volume and the mount path")]
    MissingColon,
    /// There is more than one ':'.
    #[error(
        "the entry contains {count} ':' but only one is allowed, between the volume and the mount path \
         (paths cannot contain ':', cube-studio splits entries on it)"
    )]
    ExtraColon {
        /// How many ':' the entry contains.
        count: usize,
    },
    /// The volume part has no `(kind)`.
    #[error("there is no (kind) before the ':'")]
    MissingKind,
    /// The `(` of the kind is not closed.
    #[error("the '(' of the kind is not closed by ')' before the ':'")]
    UnclosedKind,
    /// Text follows the `(kind)` before the ':'.
    #[error("{} follows the (kind); the ':' must come right after the ')'", quote(.text))]
    TextAfterKind {
        /// The text between the ')' and the ':'.
        text: String,
    },
    /// The kind is not one of the known kinds.
    #[error(
        "unknown kind {}{}; the kinds are pvc, pvc-share, storage, hostpath, configmap, secret and memory",
        quote(.kind),
        kind_hint(.suggestion)
    )]
    UnknownKind {
        /// The kind as written.
        kind: String,
        /// The known kind it probably means, when it differs only in case or '_'.
        suggestion: Option<&'static str>,
    },
    /// Nothing comes before the `(kind)`.
    #[error("nothing comes before ({kind}); write the volume's name, path or size there")]
    EmptySource {
        /// The kind, e.g. `pvc`.
        kind: &'static str,
    },
    /// A PVC, ConfigMap or Secret name is not a valid Kubernetes name.
    #[error("{} {} {problem}; {NAME_RULE}", name_label(.kind), quote(.name))]
    InvalidName {
        /// The kind whose name this is, e.g. `pvc`.
        kind: &'static str,
        /// The name as written.
        name: String,
        /// What is wrong with it.
        problem: NameProblem,
    },
    /// A host path is not acceptable.
    #[error("host path {} {problem}; {PATH_RULE}", quote(.path))]
    InvalidHostPath {
        /// The host path as written.
        path: String,
        /// What is wrong with it.
        problem: PathProblem,
    },
    /// A mount path is not acceptable.
    #[error("mount path {} {problem}; {PATH_RULE}, and not '/' itself", quote(.path))]
    InvalidMountPath {
        /// The mount path as written.
        path: String,
        /// What is wrong with it.
        problem: PathProblem,
    },
    /// A memory size is not acceptable.
    #[error("memory size {} {problem}; {MEMORY_RULE}", quote(.size))]
    InvalidMemorySize {
        /// The size as written.
        size: String,
        /// What is wrong with it.
        problem: MemorySizeProblem,
    },
    /// Two entries mount at the same path.
    #[error(
        "mount path {} is already used by entry {first_index} {}; two volumes cannot be mounted at the same path \
         (a trailing '/' does not make a path different)",
        quote(.mount_path),
        quote(.first_entry)
    )]
    DuplicateMountPath {
        /// The mount path as written in this entry.
        mount_path: String,
        /// The index of the entry that mounts there first.
        first_index: usize,
        /// The text of the entry that mounts there first.
        first_entry: String,
    },
}

/// Explains why a name is not a valid Kubernetes object name; its message is a predicate on the name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum NameProblem {
    /// The name is empty.
    #[error("is empty")]
    Empty,
    /// The name is longer than 253 bytes.
    #[error("is {len} bytes long")]
    TooLong {
        /// The name's length in bytes.
        len: usize,
    },
    /// The name contains '_', which cube-studio turned into '-' in volume names but Kubernetes rejects in objects.
    #[error("contains '_', which Kubernetes rejects in names (cube-studio only rewrote it in volume names){}",
        did_you_mean(.suggestion))]
    Underscore {
        /// The name with '_' replaced by '-' and lower-cased, when that is valid.
        suggestion: Option<String>,
    },
    /// The name contains uppercase letters.
    #[error("contains uppercase letters, which Kubernetes rejects in names{}", did_you_mean(.suggestion))]
    Uppercase {
        /// The name lower-cased, when that is valid.
        suggestion: Option<String>,
    },
    /// The name contains a character Kubernetes rejects.
    #[error("contains {character:?}, which Kubernetes rejects in names")]
    InvalidCharacter {
        /// The first such character.
        character: char,
    },
    /// The name, or a '.'-separated part of it, starts or ends with something other than a letter or digit.
    #[error("starts or ends with something other than a letter or digit, or has a '.' next to '-' or '.'")]
    BadEdge,
}

/// Explains why a host path or mount path is refused; its message is a predicate on the path.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PathProblem {
    /// The path is empty.
    #[error("is empty")]
    Empty,
    /// The path is longer than 4096 bytes.
    #[error("is {len} bytes long")]
    TooLong {
        /// The path's length in bytes.
        len: usize,
    },
    /// The path contains a control character.
    #[error("contains the control character {character:?}")]
    ControlCharacter {
        /// The first such character.
        character: char,
    },
    /// The path contains whitespace.
    #[error("contains whitespace")]
    Whitespace,
    /// The path contains ',' or ';', which separate entries.
    #[error("contains {separator:?}, which separates entries")]
    Separator {
        /// The separator found.
        separator: char,
    },
    /// The path contains ':', which separates the volume from the mount path.
    #[error("contains ':', which separates the volume from the mount path")]
    Colon,
    /// A host path contains '(' or ')', which enclose the kind.
    #[error("contains {character:?}, which a host path cannot contain because '(' and ')' enclose the kind")]
    Parenthesis {
        /// The parenthesis found.
        character: char,
    },
    /// The path does not start with '/'.
    #[error("is not absolute (it must start with '/')")]
    NotAbsolute,
    /// A mount path is '/' itself.
    #[error("is '/', the container's root, where nothing can be mounted")]
    Root,
    /// The path contains '//', an empty segment.
    #[error("contains '//' (an empty segment: write each '/' once)")]
    EmptySegment,
    /// The path contains a '.' or '..' segment.
    #[error("contains a {segment:?} segment")]
    DotSegment {
        /// The segment, "." or "..".
        segment: &'static str,
    },
}

/// Explains why a memory size is refused; its message is a predicate on the size.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum MemorySizeProblem {
    /// The size is empty.
    #[error("is empty")]
    Empty,
    /// The size does not start with a digit.
    #[error("does not start with a whole number")]
    NotANumber,
    /// The size has a fractional part.
    #[error("is a fraction; use a smaller unit instead, e.g. 512M rather than 0.5G")]
    Fraction,
    /// The size is zero.
    #[error("is zero; a memory volume needs a size above 0")]
    Zero,
    /// The number has a leading zero.
    #[error("has a leading zero")]
    LeadingZero,
    /// The number has no unit.
    #[error("has no unit")]
    MissingUnit,
    /// The unit is not one of the accepted units.
    #[error("has the unknown unit {}", quote(.unit))]
    UnknownUnit {
        /// The unit as written.
        unit: String,
    },
    /// The size does not fit in 64 bits of bytes.
    #[error("is too large (more than 2^64 - 1 bytes)")]
    TooLarge,
}
