//! List pagination and filtering as every Cube list RPC does them: `page_size` coerced into range, opaque
//! `page_token`s that carry the keyset position of the last row, and `filter` strings of `field = value`
//! conditions joined by `AND`.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::error::ApiError;

/// The page size when a request gives none.
pub const DEFAULT_PAGE_SIZE: u64 = 50;
/// The largest page a list returns.
pub const MAX_PAGE_SIZE: u64 = 1000;

/// Returns the page size for a request's `page_size`: the default for 0, at most [`MAX_PAGE_SIZE`].
///
/// # Errors
/// `INVALID_ARGUMENT` naming `page_size` when it is negative.
pub fn page_size(requested: i32) -> Result<u64, ApiError> {
    match u64::try_from(requested) {
        Ok(0) => Ok(DEFAULT_PAGE_SIZE),
        Ok(size) => Ok(size.min(MAX_PAGE_SIZE)),
        Err(_) => Err(ApiError::invalid("page_size", "must not be negative")),
    }
}

/// Encodes the keyset position after which the next page starts.
pub fn encode_token<T: Serialize>(position: &T) -> String {
    serde_json::to_vec(position).map_or_else(|_| String::new(), |json| URL_SAFE_NO_PAD.encode(json))
}

/// Ends a page: `rows` were read with a limit of `size + 1`; keeps the first `size` and returns the token of the
/// next page (the keyset position of the last row kept), or an empty token when there is no next page.
pub fn finish_page<T, K: Serialize>(rows: &mut Vec<T>, size: u64, position: impl Fn(&T) -> K) -> String {
    let more = rows.len() as u64 > size;
    rows.truncate(usize::try_from(size).unwrap_or(usize::MAX));
    match rows.last() {
        Some(last) if more => encode_token(&position(last)),
        _ => String::new(),
    }
}

/// Decodes a request's `page_token`; `None` for the first page.
///
/// # Errors
/// `INVALID_ARGUMENT` naming `page_token` when it was not made by [`encode_token`] for this list.
pub fn decode_token<T: DeserializeOwned>(token: &str) -> Result<Option<T>, ApiError> {
    if token.is_empty() {
        return Ok(None);
    }
    let invalid = || ApiError::invalid("page_token", "is not a page token this list returned");
    let json = URL_SAFE_NO_PAD.decode(token).map_err(|_| invalid())?;
    serde_json::from_slice(&json).map(Some).map_err(|_| invalid())
}

/// One condition of a filter: `field = value`, the value unquoted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Condition {
    /// The field.
    pub field: String,
    /// The value.
    pub value: String,
}

/// Parses `filter` (conditions `field = value` joined by `AND`; values bare or double-quoted) accepting only
/// the fields in `fields`.
///
/// # Errors
/// `INVALID_ARGUMENT` naming `filter` and showing the accepted form and fields.
pub fn parse_filter(filter: &str, fields: &[&str]) -> Result<Vec<Condition>, ApiError> {
    let invalid = |what: String| {
        ApiError::invalid(
            "filter",
            format!(
                "{what}; expected conditions `field = value` joined by AND, with fields {}",
                fields.join(", ")
            ),
        )
    };
    let mut conditions = Vec::new();
    let mut rest = filter.trim();
    while !rest.is_empty() {
        let (field, after) = rest
            .split_once('=')
            .ok_or_else(|| invalid(format!("no `=` in {rest:?}")))?;
        let field = field.trim();
        if !fields.contains(&field) {
            return Err(invalid(format!("unknown field {field:?}")));
        }
        let after = after.trim_start();
        let (value, remainder) = if let Some(quoted) = after.strip_prefix('"') {
            let end = quoted
                .find('"')
                .ok_or_else(|| invalid("unterminated quoted value".into()))?;
            (&quoted[..end], &quoted[end + 1..])
        } else {
            let end = after.find(char::is_whitespace).unwrap_or(after.len());
            (&after[..end], &after[end..])
        };
        conditions.push(Condition {
            field: field.to_owned(),
            value: value.to_owned(),
        });
        let remainder = remainder.trim_start();
        rest = if remainder.is_empty() {
            remainder
        } else {
            remainder
                .strip_prefix("AND ")
                .ok_or_else(|| invalid(format!("expected AND before {remainder:?}")))?
                .trim_start()
        };
    }
    Ok(conditions)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_parse_and_refuse_unknown_fields() -> Result<(), ApiError> {
        let parsed = parse_filter(r#"actor = "users/alice" AND success = false"#, &["actor", "success"])?;
        assert_eq!(
            parsed,
            [
                Condition {
                    field: "actor".into(),
                    value: "users/alice".into()
                },
                Condition {
                    field: "success".into(),
                    value: "false".into()
                }
            ]
        );
        assert!(parse_filter("", &["a"])?.is_empty());
        for bad in ["nope = 1", "actor", r#"actor = "x"#, "actor = x OR actor = y"] {
            assert!(parse_filter(bad, &["actor"]).is_err(), "{bad}");
        }
        Ok(())
    }

    #[test]
    fn page_tokens_round_trip_and_garbage_is_refused() -> Result<(), ApiError> {
        let token = encode_token(&("alice", 7));
        assert_eq!(decode_token::<(String, i64)>(&token)?, Some(("alice".into(), 7)));
        assert_eq!(decode_token::<(String, i64)>("")?, None);
        assert!(decode_token::<(String, i64)>("not a token").is_err());
        assert_eq!(page_size(0)?, DEFAULT_PAGE_SIZE);
        assert_eq!(page_size(5000)?, MAX_PAGE_SIZE);
        assert!(page_size(-1).is_err());
        Ok(())
    }
}
