//! The `update_mask` of standard Update methods (AIP-134): which of a resource's fields an update changes.

use crate::{ApiError, FieldViolation};

/// The fields an update's `update_mask` names, checked against the fields the method may change.
#[derive(Debug)]
pub struct UpdateMask {
    paths: Vec<String>,
    every: bool,
}

impl UpdateMask {
    /// Reads `mask` for a method that may change the fields `accepted` (top-level field names); `*` names all of
    /// them.
    ///
    /// # Errors
    /// INVALID_ARGUMENT naming `update_mask` when the mask is missing or empty, or for each path that names a field
    /// outside `accepted`.
    pub fn parse(mask: Option<&prost_types::FieldMask>, accepted: &[&str]) -> Result<Self, ApiError> {
        let paths = mask.map(|mask| mask.paths.clone()).unwrap_or_default();
        let fields = accepted.join(", ");
        if paths.is_empty() {
            return Err(ApiError::invalid(
                "update_mask",
                format!("name the fields to change ({fields}), or * for all"),
            ));
        }
        let found: Vec<FieldViolation> = paths
            .iter()
            .filter(|path| path.as_str() != "*" && !accepted.contains(&path.as_str()))
            .map(|path| {
                FieldViolation::new(
                    "update_mask",
                    format!("{path:?} cannot be changed; the mask accepts {fields}, or * for all"),
                )
            })
            .collect();
        if !found.is_empty() {
            return Err(ApiError::InvalidArgument(found));
        }
        let every = paths.iter().any(|path| path == "*");
        Ok(Self { paths, every })
    }

    /// Whether the update changes `field`.
    pub fn wants(&self, field: &str) -> bool {
        self.every || self.paths.iter().any(|path| path == field)
    }
}

#[cfg(test)]
mod tests {
    use super::UpdateMask;
    use crate::ApiError;

    fn mask(paths: &[&str]) -> prost_types::FieldMask {
        prost_types::FieldMask {
            paths: paths.iter().map(|path| (*path).to_owned()).collect(),
        }
    }

    #[test]
    fn a_mask_names_accepted_fields_or_all_of_them() {
        let accepted = ["display_name", "cron"];
        let some = UpdateMask::parse(Some(&mask(&["cron"])), &accepted).expect("cron is accepted");
        assert!(some.wants("cron") && !some.wants("display_name"));
        let all = UpdateMask::parse(Some(&mask(&["*"])), &accepted).expect("* is accepted");
        assert!(all.wants("cron") && all.wants("display_name"));
        for empty in [None, Some(mask(&[]))] {
            let refused = UpdateMask::parse(empty.as_ref(), &accepted).expect_err("an empty mask");
            assert!(
                matches!(&refused, ApiError::InvalidArgument(found) if found.len() == 1),
                "{refused:?}"
            );
        }
        let refused = UpdateMask::parse(Some(&mask(&["cron", "name", "", "etag"])), &accepted).expect_err("unknown");
        let ApiError::InvalidArgument(found) = refused else {
            panic!("{refused:?}");
        };
        assert_eq!(found.len(), 3, "{found:?}");
        assert!(
            found.iter().all(|violation| violation.field == "update_mask"),
            "{found:?}"
        );
    }
}
