//! The resource names the scheduler reads: projects (`projects/{project}`), the workloads admitted in them
//! (`projects/{project}/{collection}/{id}`, e.g. `projects/vision/notebooks/alice-lab`) and clusters
//! (`clusters/{cluster}`). Each is checked here before anything is asked of another service or stored, and a
//! malformed one is reported by field, echoing at most [`ECHO_LIMIT`] characters of what was sent.

use cube_kit::FieldViolation;

/// The longest workload name, in bytes.
pub(crate) const MAX_WORKLOAD_NAME: usize = 250;

/// How many characters of a malformed value an error message repeats.
pub(crate) const ECHO_LIMIT: usize = 64;

/// What a project, cluster or other DNS-label id may be.
pub(crate) const ID_RULE: &str =
    "2 to 63 lowercase letters, digits and dashes, starting with a letter and ending with a letter or digit";

/// What a workload name may be.
const WORKLOAD_RULE: &str = "the workload's resource name under its project, projects/{project}/{collection}/{id} \
     (e.g. projects/vision/notebooks/alice-lab; nested collections such as \
     projects/vision/pipelines/p/runs/r too), whose collections are letters and digits starting with a letter and \
     whose ids are letters, digits, '-', '.', '_' or '~', at most 250 bytes in all";

/// `value` as error messages show it: quoted, and cut after [`ECHO_LIMIT`] characters.
pub(crate) fn shown(value: &str) -> String {
    match value.char_indices().nth(ECHO_LIMIT) {
        Some((end, _)) => format!("{:?}… ({} bytes)", &value[..end], value.len()),
        None => format!("{value:?}"),
    }
}

/// The project id of `name` (`projects/{project}`), or a violation of `field` saying what is accepted.
pub(crate) fn project_id(field: &str, name: &str) -> Result<String, FieldViolation> {
    match name.strip_prefix("projects/") {
        Some(id) if cube_kit::names::is_project_id(id) => Ok(id.to_owned()),
        _ => Err(FieldViolation::new(
            field,
            format!(
                "expected projects/{{project}}, the project being {ID_RULE}; got {}",
                shown(name)
            ),
        )),
    }
}

/// Whether `segment` is a collection id: a letter, then letters and digits (`notebooks`, `inferenceServices`).
fn collection(segment: &str) -> bool {
    segment.as_bytes().first().is_some_and(u8::is_ascii_alphabetic)
        && segment.bytes().all(|b| b.is_ascii_alphanumeric())
}

/// Whether `segment` is a resource id: letters, digits, `-`, `.`, `_` or `~`, and not `.` or `..`.
fn resource_id(segment: &str) -> bool {
    !segment.is_empty()
        && segment != "."
        && segment != ".."
        && segment
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~'))
}

/// The project id a workload name lies under, or a violation of `field`: the name must be
/// `projects/{project}/{collection}/{id}`, optionally followed by more `/{collection}/{id}` pairs.
pub(crate) fn workload_project(field: &str, workload: &str) -> Result<String, FieldViolation> {
    let refuse = || {
        let got = if workload.is_empty() {
            "nothing".to_owned()
        } else {
            shown(workload)
        };
        FieldViolation::new(field, format!("expected {WORKLOAD_RULE}; got {got}"))
    };
    if workload.len() > MAX_WORKLOAD_NAME {
        return Err(refuse());
    }
    let mut segments = workload.split('/');
    let (Some("projects"), Some(project)) = (segments.next(), segments.next()) else {
        return Err(refuse());
    };
    let rest: Vec<&str> = segments.collect();
    let pairs_valid = !rest.is_empty()
        && rest.len().is_multiple_of(2)
        && rest.chunks(2).all(|pair| collection(pair[0]) && resource_id(pair[1]));
    if !cube_kit::names::is_project_id(project) || !pairs_valid {
        return Err(refuse());
    }
    Ok(project.to_owned())
}

/// Checks that `workload` is a workload name under the project `project` (an id); a violation of `field` when it
/// is malformed or lies under another project.
pub(crate) fn workload_in(field: &str, workload: &str, project: &str) -> Result<(), FieldViolation> {
    let under = workload_project(field, workload)?;
    if under != project {
        return Err(FieldViolation::new(
            field,
            format!(
                "must lie under the project it is admitted in, projects/{project}/…; got {}",
                shown(workload)
            ),
        ));
    }
    Ok(())
}

/// The cluster id of `name` (`clusters/{cluster}`), or a violation of `field` saying what is accepted.
pub(crate) fn cluster_id(field: &str, name: &str) -> Result<String, FieldViolation> {
    match name.strip_prefix("clusters/") {
        Some(id) if cube_clusters::valid_name(id) => Ok(id.to_owned()),
        _ => Err(FieldViolation::new(
            field,
            format!(
                "expected clusters/{{cluster}}, the cluster being {ID_RULE}; got {}",
                shown(name)
            ),
        )),
    }
}

/// Whether `text` is the name part of a Kubernetes label key, or a non-empty label value: at most 63 letters,
/// digits, `-`, `_` or `.`, alphanumeric at both ends.
fn label_part(text: &str) -> bool {
    let bytes = text.as_bytes();
    (1..=63).contains(&bytes.len())
        && bytes[0].is_ascii_alphanumeric()
        && bytes[bytes.len() - 1].is_ascii_alphanumeric()
        && bytes
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// Whether `prefix` is a label key's prefix: a DNS subdomain of at most 253 characters.
fn label_prefix(prefix: &str) -> bool {
    prefix.len() <= 253 && prefix.split('.').all(cube_clusters::dns_label)
}

/// A Kubernetes label written `key=value` (`app=bert`, `cube.io/inference-service=bert`), or a violation of
/// `field` saying what is accepted.
pub(crate) fn label(field: &str, text: &str) -> Result<(String, String), FieldViolation> {
    let refuse = || {
        FieldViolation::new(
            field,
            format!(
                "expected a Kubernetes label key=value (e.g. cube.io/inference-service=bert): the key an optional \
                 DNS-subdomain prefix and '/', then a name, the name and the value at most 63 letters, digits, '-', \
                 '_' or '.', alphanumeric at both ends; got {}",
                shown(text)
            ),
        )
    };
    let (key, value) = text.split_once('=').ok_or_else(refuse)?;
    let name_valid = match key.split_once('/') {
        Some((prefix, name)) => label_prefix(prefix) && label_part(name),
        None => label_part(key),
    };
    if !name_valid || !(value.is_empty() || label_part(value)) {
        return Err(refuse());
    }
    Ok((key.to_owned(), value.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn project_names_are_checked_as_projects_checks_them() {
        assert_eq!(project_id("project", "projects/vision").ok().as_deref(), Some("vision"));
        for bad in [
            "",
            "projects/",
            "projects/a b",
            "projects/a",
            "projects/Vision",
            "vision",
            "projects/v/x",
            "projects/-v",
        ] {
            let violation = project_id("project", bad).expect_err(bad);
            assert_eq!(violation.field, "project");
            assert!(
                violation.description.contains("expected projects/{project}"),
                "{violation:?}"
            );
        }
    }

    #[test]
    fn workload_names_lie_under_a_project() {
        let table = [
            ("projects/vision/notebooks/alice-lab", Some("vision")),
            ("projects/vision/runs/r-1", Some("vision")),
            ("projects/vision/pipelines/p/runs/2024.01_a~b", Some("vision")),
            ("projects/vision/inferenceServices/bert", Some("vision")),
            ("", None),
            ("projects/vision", None),
            ("projects/vision/", None),
            ("projects/vision/notebooks", None),
            ("projects/vision/notebooks/", None),
            ("projects/vision/notebooks/a/b", None),
            ("projects/vision//a", None),
            ("projects/vision/notebooks/a b", None),
            ("projects/vision/notebooks/..", None),
            ("projects/a b/notebooks/x", None),
            ("vision/notebooks/x", None),
            ("/projects/vision/notebooks/x", None),
            ("projects/vision/1st/x", None),
        ];
        for (name, project) in table {
            assert_eq!(workload_project("workload", name).ok().as_deref(), project, "{name:?}");
        }
        let long = format!("projects/vision/runs/{}", "r".repeat(MAX_WORKLOAD_NAME));
        let violation = workload_project("workload", &long).expect_err("too long");
        assert!(
            violation.description.len() < 700,
            "a long name is not echoed whole: {violation:?}"
        );
        assert!(workload_in("workload", "projects/vision/runs/r", "vision").is_ok());
        let violation = workload_in("workload", "projects/speech/notebooks/x", "public").expect_err("elsewhere");
        assert_eq!(violation.field, "workload");
        assert!(violation.description.contains("projects/public/"), "{violation:?}");
    }

    #[test]
    fn long_values_are_cut_in_messages() {
        assert_eq!(shown("abc"), "\"abc\"");
        let cut = shown(&"x".repeat(10_000));
        assert!(cut.len() < 100 && cut.ends_with("(10000 bytes)"), "{cut}");
    }

    #[test]
    fn replica_labels_are_kubernetes_labels() {
        let table = [
            ("app=bert", true),
            ("cube.io/inference-service=bert", true),
            ("app=", true),
            ("app", false),
            ("=bert", false),
            ("a b=c", false),
            ("app=b c", false),
            ("app=bert=x", false),
            ("Cube.IO/x=y", false),
            ("/x=y", false),
            ("app=-bert", false),
        ];
        for (text, valid) in table {
            assert_eq!(label("replica_label", text).is_ok(), valid, "{text:?}");
        }
    }
}
