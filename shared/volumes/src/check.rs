//! Checks of the parts of an entry: Kubernetes names and paths.

use crate::error::{NameProblem, PathProblem};

/// Longest Kubernetes object name (a DNS-1123 subdomain), in bytes.
const MAX_NAME_LEN: usize = 253;

/// Longest host path or mount path, in bytes (Linux's `PATH_MAX`).
const MAX_PATH_LEN: usize = 4096;

/// Checks that `name` is a DNS-1123 subdomain, as Kubernetes requires of PVC, ConfigMap and Secret names.
pub(crate) fn check_name(name: &str) -> Result<(), NameProblem> {
    if name.is_empty() {
        return Err(NameProblem::Empty);
    }
    if name.len() > MAX_NAME_LEN {
        return Err(NameProblem::TooLong { len: name.len() });
    }
    let suggestion = || {
        let fixed = name.to_ascii_lowercase().replace('_', "-");
        is_name(&fixed).then_some(fixed)
    };
    if name.contains('_') {
        return Err(NameProblem::Underscore {
            suggestion: suggestion(),
        });
    }
    if name.chars().any(|c| c.is_ascii_uppercase()) {
        return Err(NameProblem::Uppercase {
            suggestion: suggestion(),
        });
    }
    if let Some(character) = name
        .chars()
        .find(|&c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.'))
    {
        return Err(NameProblem::InvalidCharacter { character });
    }
    let edge_ok = |label: &str| {
        let alphanumeric = |b: Option<u8>| b.is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
        alphanumeric(label.bytes().next()) && alphanumeric(label.bytes().last())
    };
    if !name.split('.').all(edge_ok) {
        return Err(NameProblem::BadEdge);
    }
    Ok(())
}

/// Tells whether `name` is a valid Kubernetes name.
fn is_name(name: &str) -> bool {
    check_name(name).is_ok()
}

/// Which path is checked: host paths may be '/' but not contain parentheses; mount paths the reverse.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum PathRole {
    /// The path on the node, left of `(hostpath)`.
    Host,
    /// The path in the container, right of ':'.
    Mount,
}

/// Checks a host path or mount path; a single trailing '/' is allowed and kept.
pub(crate) fn check_path(path: &str, role: PathRole) -> Result<(), PathProblem> {
    if path.is_empty() {
        return Err(PathProblem::Empty);
    }
    if path.len() > MAX_PATH_LEN {
        return Err(PathProblem::TooLong { len: path.len() });
    }
    for character in path.chars() {
        match character {
            c if c.is_control() => return Err(PathProblem::ControlCharacter { character: c }),
            c if c.is_whitespace() => return Err(PathProblem::Whitespace),
            ',' | ';' => return Err(PathProblem::Separator { separator: character }),
            ':' => return Err(PathProblem::Colon),
            '(' | ')' if role == PathRole::Host => return Err(PathProblem::Parenthesis { character }),
            _ => {}
        }
    }
    let Some(relative) = path.strip_prefix('/') else {
        return Err(PathProblem::NotAbsolute);
    };
    if relative.is_empty() {
        return match role {
            PathRole::Host => Ok(()),
            PathRole::Mount => Err(PathProblem::Root),
        };
    }
    let segments = relative.strip_suffix('/').unwrap_or(relative);
    for segment in segments.split('/') {
        match segment {
            "" => return Err(PathProblem::EmptySegment),
            "." => return Err(PathProblem::DotSegment { segment: "." }),
            ".." => return Err(PathProblem::DotSegment { segment: ".." }),
            _ => {}
        }
    }
    Ok(())
}

/// Returns a mount path without its trailing '/', the form two mount paths are compared in.
pub(crate) fn without_trailing_slash(path: &str) -> &str {
    match path.strip_suffix('/') {
        Some(stripped) if !stripped.is_empty() => stripped,
        _ => path,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_dns_1123_subdomains() {
        for good in [
            "a",
            "0",
            "kubeflow-user-workspace",
            "a.b",
            "a-b.c-d",
            "x1.2y",
            &"a".repeat(253),
        ] {
            assert_eq!(check_name(good), Ok(()), "{good}");
        }
        assert_eq!(check_name(""), Err(NameProblem::Empty));
        assert_eq!(check_name(&"a".repeat(254)), Err(NameProblem::TooLong { len: 254 }));
        assert_eq!(
            check_name("my_Claim"),
            Err(NameProblem::Underscore {
                suggestion: Some("my-claim".into())
            })
        );
        assert_eq!(check_name("_x"), Err(NameProblem::Underscore { suggestion: None }));
        assert_eq!(
            check_name("Claim"),
            Err(NameProblem::Uppercase {
                suggestion: Some("claim".into())
            })
        );
        assert_eq!(check_name("a/b"), Err(NameProblem::InvalidCharacter { character: '/' }));
        assert_eq!(check_name("é"), Err(NameProblem::InvalidCharacter { character: 'é' }));
        for bad_edge in ["-a", "a-", ".a", "a.", "a..b", "a.-b", "a-.b"] {
            assert_eq!(check_name(bad_edge), Err(NameProblem::BadEdge), "{bad_edge}");
        }
    }

    #[test]
    fn paths_are_absolute_and_unambiguous() {
        for good in ["/mnt", "/mnt/", "/dev/shm", "/a/b.c/..d/...", "/x(1)", "/数据"] {
            assert_eq!(check_path(good, PathRole::Mount), Ok(()), "{good}");
        }
        assert_eq!(check_path("/", PathRole::Host), Ok(()));
        assert_eq!(check_path("/", PathRole::Mount), Err(PathProblem::Root));
        assert_eq!(check_path("", PathRole::Mount), Err(PathProblem::Empty));
        assert_eq!(check_path("mnt", PathRole::Mount), Err(PathProblem::NotAbsolute));
        assert_eq!(check_path("//", PathRole::Host), Err(PathProblem::EmptySegment));
        assert_eq!(check_path("/a//b", PathRole::Mount), Err(PathProblem::EmptySegment));
        assert_eq!(check_path("/a//", PathRole::Mount), Err(PathProblem::EmptySegment));
        assert_eq!(
            check_path("/a/../b", PathRole::Mount),
            Err(PathProblem::DotSegment { segment: ".." })
        );
        assert_eq!(
            check_path("/a/..", PathRole::Mount),
            Err(PathProblem::DotSegment { segment: ".." })
        );
        assert_eq!(
            check_path("/a/./", PathRole::Mount),
            Err(PathProblem::DotSegment { segment: "." })
        );
        assert_eq!(check_path("/a:b", PathRole::Mount), Err(PathProblem::Colon));
        assert_eq!(check_path("/a b", PathRole::Mount), Err(PathProblem::Whitespace));
        assert_eq!(
            check_path("/a\0", PathRole::Host),
            Err(PathProblem::ControlCharacter { character: '\0' })
        );
        assert_eq!(
            check_path("/a,b", PathRole::Host),
            Err(PathProblem::Separator { separator: ',' })
        );
        assert_eq!(
            check_path("/a(b", PathRole::Host),
            Err(PathProblem::Parenthesis { character: '(' })
        );
        let long = format!("/{}", "a".repeat(4096));
        assert_eq!(
            check_path(&long, PathRole::Mount),
            Err(PathProblem::TooLong { len: 4097 })
        );
        assert_eq!(check_path(&long[..4096], PathRole::Mount), Ok(()));
    }

    #[test]
    fn trailing_slash_is_ignored_only_for_comparison() {
        assert_eq!(without_trailing_slash("/mnt/"), "/mnt");
        assert_eq!(without_trailing_slash("/mnt"), "/mnt");
        assert_eq!(without_trailing_slash("/"), "/");
    }
}
