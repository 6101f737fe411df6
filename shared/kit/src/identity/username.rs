//! Usernames: the one rule every service reads them by.

use crate::error::ApiError;

/// The longest username, so that one always fits a Kubernetes label value.
pub const MAX_USERNAME_BYTES: usize = 63;

/// Returns the user id a login name stands for: the name in ASCII lower case, so that `John.Smith`, `JOHN.SMITH`
/// and `john.smith` are one user, `users/john.smith`.
///
/// A name is 1 to 63 ASCII letters, digits, `.`, `_` and `-`, starting and ending with a letter or a digit
/// (`^[A-Za-z0-9]([A-Za-z0-9._-]{0,61}[A-Za-z0-9])?$`). Nothing else is rewritten: `.`, `_` and `-` stay apart, so
/// that the directory's `john.smith` and `john_smith` never share an id, and any other character (spaces,
/// non-ASCII letters, the LDAP filter and DN metacharacters `*()\,=+<>#;"` and NUL, `/`, `@`, quotes) is refused.
///
/// # Errors
/// INVALID_ARGUMENT naming `field` when the name breaks the rule.
pub fn canonical_username(field: &str, name: &str) -> Result<String, ApiError> {
    let bytes = name.as_bytes();
    let inner = |byte: &u8| byte.is_ascii_alphanumeric() || matches!(byte, b'.' | b'_' | b'-');
    let valid = (1..=MAX_USERNAME_BYTES).contains(&bytes.len())
        && bytes[0].is_ascii_alphanumeric()
        && bytes[bytes.len() - 1].is_ascii_alphanumeric()
        && bytes.iter().all(inner);
    if valid {
        return Ok(name.to_ascii_lowercase());
    }
    let shown: String = name.chars().take(MAX_USERNAME_BYTES).collect();
    Err(ApiError::invalid(
        field,
        format!(
            "username {shown:?} must be 1 to {MAX_USERNAME_BYTES} ASCII letters, digits, '.', '_' and '-', starting \
             and ending with a letter or digit, e.g. John.Smith or j_smith (case is ignored: John.Smith is user \
             john.smith)"
        ),
    ))
}
