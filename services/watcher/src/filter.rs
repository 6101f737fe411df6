//! What a caller asks for and may see: an events filter parsed and checked field by field, then narrowed to the
//! projects the caller belongs to. Plain decisions; the handlers read the memberships and the store applies the
//! result.

use cube_kit::ApiError;
use cube_kit::names::{PROJECT_ID_RULE, is_project_id};
use cube_kit::page::parse_filter;

use crate::store::{EventQuery, event};

/// The fields an events filter takes.
const FIELDS: [&str; 10] = [
    "project",
    "kind",
    "cluster",
    "namespace",
    "name",
    "uid",
    "type",
    "reason",
    "after",
    "before",
];

/// The kinds a filter names.
const KINDS: [&str; 4] = ["POD", "DEPLOYMENT", "NODE", "LOCAL_PROCESS"];

/// The states a filter's `type` names.
const STATES: [&str; 6] = ["PENDING", "RUNNING", "SUCCEEDED", "FAILED", "UNKNOWN", "DELETED"];

/// An events filter as parsed, before the caller's memberships are applied.
#[derive(Debug, Clone, Default)]
pub(crate) struct Filter {
    /// `project = projects/{p}`.
    pub(crate) project: Option<String>,
    /// `kind = NODE`, …
    pub(crate) kind: Option<String>,
    /// The other equality conditions.
    pub(crate) equal: Vec<(event::Column, String)>,
    /// `after = <RFC 3339>`, Unix ms.
    pub(crate) after_ms: Option<i64>,
    /// `before = <RFC 3339>`, Unix ms.
    pub(crate) before_ms: Option<i64>,
}

/// Parses `filter` (see `ListEventsRequest.filter`), naming the field of each mistake.
///
/// # Errors
/// `INVALID_ARGUMENT` naming `filter` with the condition that is wrong.
pub(crate) fn parse(filter: &str) -> Result<Filter, ApiError> {
    let mut parsed = Filter::default();
    let invalid = |message: String| ApiError::invalid("filter", message);
    for condition in parse_filter(filter, &FIELDS)? {
        let value = condition.value;
        match condition.field.as_str() {
            "project" => {
                if !value.strip_prefix("projects/").is_some_and(is_project_id) {
                    return Err(invalid(format!(
                        "project {value:?} is not of the form projects/{{project}}, the project being \
                         {PROJECT_ID_RULE}"
                    )));
                }
                parsed.project = Some(value);
            }
            "kind" => {
                if !KINDS.contains(&value.as_str()) {
                    return Err(invalid(format!("kind {value:?} is not one of {}", KINDS.join(", "))));
                }
                parsed.equal.push((event::Column::Kind, value.clone()));
                parsed.kind = Some(value);
            }
            "type" => {
                if !STATES.contains(&value.as_str()) {
                    return Err(invalid(format!("type {value:?} is not one of {}", STATES.join(", "))));
                }
                parsed.equal.push((event::Column::State, value));
            }
            "after" => parsed.after_ms = Some(time(&value).ok_or_else(|| invalid(bad_time("after", &value)))?),
            "before" => parsed.before_ms = Some(time(&value).ok_or_else(|| invalid(bad_time("before", &value)))?),
            field => {
                let column = match field {
                    "cluster" => event::Column::Cluster,
                    "namespace" => event::Column::Namespace,
                    "name" => event::Column::Name,
                    "uid" => event::Column::Uid,
                    _ => event::Column::Reason,
                };
                parsed.equal.push((column, value));
            }
        }
    }
    Ok(parsed)
}

fn bad_time(field: &str, value: &str) -> String {
    format!("{field} {value:?} is not an RFC 3339 time like 2026-12-01T00:00:00Z")
}

/// An RFC 3339 time in Unix ms.
fn time(value: &str) -> Option<i64> {
    chrono::DateTime::parse_from_rfc3339(value)
        .ok()
        .map(|time| time.timestamp_millis())
}

/// Who is asking, as far as events go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Reader {
    /// An admin: every event, Nodes' too.
    Admin,
    /// A user who is a member of these projects (`projects/{p}`), and sees only their events.
    Member(Vec<String>),
}

/// The query `filter` makes for `reader`: an admin's as asked; a member's narrowed to their projects.
///
/// # Errors
/// A member naming a project they do not belong to gets NOT_FOUND for it (as every service answers a
/// non-member), and asking for Node events PERMISSION_DENIED (`events.nodes`, admins only).
pub(crate) fn query(filter: Filter, reader: &Reader) -> Result<EventQuery, ApiError> {
    let Filter {
        project,
        kind,
        mut equal,
        after_ms,
        before_ms,
    } = filter;
    let visible = match reader {
        Reader::Admin => {
            if let Some(project) = project {
                equal.push((event::Column::Project, project));
            }
            None
        }
        Reader::Member(projects) => {
            if kind.as_deref() == Some("NODE") {
                return Err(ApiError::PermissionDenied {
                    permission: "events.nodes".to_owned(),
                });
            }
            match project {
                Some(project) if projects.contains(&project) => Some(vec![project]),
                Some(project) => {
                    return Err(ApiError::NotFound {
                        kind: "project",
                        name: project,
                    });
                }
                None => Some(projects.clone()),
            }
        }
    };
    Ok(EventQuery {
        visible,
        equal,
        after_ms,
        before_ms,
    })
}

/// The id in an event name (`events/{id}`), for `field`.
///
/// # Errors
/// `INVALID_ARGUMENT` naming `field` when `name` is not an event name.
pub(crate) fn event_id(field: &'static str, name: &str) -> Result<i64, ApiError> {
    name.strip_prefix("events/")
        .and_then(|id| id.parse::<i64>().ok())
        .filter(|id| *id >= 0)
        .ok_or_else(|| ApiError::invalid(field, format!("{name:?} is not an event name, events/{{id}}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(projects: &[&str]) -> Reader {
        Reader::Member(projects.iter().map(|project| (*project).to_owned()).collect())
    }

    #[test]
    fn every_field_parses_and_mistakes_name_the_filter() -> Result<(), ApiError> {
        let filter = parse(
            r#"project = "projects/vision" AND kind = POD AND type = FAILED AND reason = OOMKilled AND cluster = dev AND after = "2026-12-01T00:00:00Z" AND before = "2026-12-02T00:00:00+01:00""#,
        )?;
        assert_eq!(filter.project.as_deref(), Some("projects/vision"));
        assert_eq!(filter.kind.as_deref(), Some("POD"));
        assert_eq!(filter.after_ms, Some(1_796_083_200_000));
        assert_eq!(filter.before_ms, Some(1_796_166_000_000));
        assert_eq!(filter.equal.len(), 4);
        for bad in [
            "project = vision",
            "project = projects/a/b",
            "project = projects/p",
            "kind = pods",
            "type = GONE",
            "after = yesterday",
            "colour = red",
        ] {
            let error = parse(bad).err().map(|error| error.to_string()).unwrap_or_default();
            assert!(error.contains("filter"), "{bad}: {error}");
        }
        Ok(())
    }

    #[test]
    fn members_see_their_projects_only_and_admins_everything() -> Result<(), ApiError> {
        let everything = query(Filter::default(), &Reader::Admin)?;
        assert_eq!(everything.visible, None);
        let mine = query(Filter::default(), &member(&["projects/aa", "projects/bb"]))?;
        assert_eq!(
            mine.visible,
            Some(vec!["projects/aa".to_owned(), "projects/bb".to_owned()])
        );
        let one = query(
            parse("project = projects/bb")?,
            &member(&["projects/aa", "projects/bb"]),
        )?;
        assert_eq!(one.visible, Some(vec!["projects/bb".to_owned()]));
        let other = query(parse("project = projects/cc")?, &member(&["projects/aa"]));
        assert!(matches!(other, Err(ApiError::NotFound { .. })));
        let nodes = query(parse("kind = NODE")?, &member(&["projects/aa"]));
        assert!(matches!(nodes, Err(ApiError::PermissionDenied { .. })));
        let admin_one = query(parse("project = projects/cc")?, &Reader::Admin)?;
        assert_eq!(admin_one.visible, None);
        assert!(
            matches!(admin_one.equal.as_slice(), [(event::Column::Project, project)] if project == "projects/cc"),
            "{:?}",
            admin_one.equal
        );
        Ok(())
    }

    #[test]
    fn event_names_carry_ids() {
        assert_eq!(event_id("resume_after", "events/42").ok(), Some(42));
        for bad in ["42", "events/", "events/x", "events/-1", "runs/4"] {
            assert!(event_id("resume_after", bad).is_err(), "{bad}");
        }
    }
}
