//! The naming rules every service checks the same way, so that a name one service accepts is never refused by
//! the service it asks next.

/// What a project id is, for error messages.
pub const PROJECT_ID_RULE: &str = "2 to 63 lowercase letters, digits and dashes, starting with a letter";

/// Whether `label` is an RFC 1123 DNS label: 1 to 63 lowercase letters, digits and dashes, starting and ending
/// with a letter or digit (each dot-separated part of a DNS subdomain).
pub fn dns_label(label: &str) -> bool {
    let bytes = label.as_bytes();
    (1..=63).contains(&bytes.len())
        && bytes.first().is_some_and(u8::is_ascii_alphanumeric)
        && bytes.last().is_some_and(u8::is_ascii_alphanumeric)
        && bytes
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-')
}

/// Whether `id` is a project id (see [`PROJECT_ID_RULE`]): a DNS label of at least 2 characters starting with a
/// letter. Cluster names follow the same rule.
pub fn is_project_id(id: &str) -> bool {
    id.len() >= 2 && id.starts_with(|c: char| c.is_ascii_lowercase()) && dns_label(id)
}

#[cfg(test)]
mod tests {
    use super::{dns_label, is_project_id};

    #[test]
    fn project_ids_are_dns_labels_of_two_or_more_starting_with_a_letter() {
        for good in ["ab", "vision", "a1", "team-7", &"a".repeat(63)] {
            assert!(is_project_id(good), "{good}");
        }
        for bad in ["", "p", "1a", "-ab", "ab-", "Ab", "a_b", "a.b", &"a".repeat(64), "é1"] {
            assert!(!is_project_id(bad), "{bad}");
        }
        assert!(dns_label("1a") && dns_label("p") && !dns_label("a-") && !dns_label(""));
    }
}
