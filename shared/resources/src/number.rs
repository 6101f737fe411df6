//! The pieces the three grammars share: decimals in thousandths, ranges and label-like words.

use crate::error::Problem;

/// Parses a non-negative decimal with at most 3 significant decimals into thousandths: `0.5` → 500.
///
/// Digits are ASCII only; a leading `.` is accepted (`.5`), a trailing one is not (`5.`); trailing zeros beyond
/// the third decimal are accepted (`0.5000`).
pub(crate) fn thousandths(text: &str) -> Result<u64, Problem> {
    if text.starts_with('-') {
        return Err(Problem::Negative);
    }
    let (whole, fraction) = match text.split_once('.') {
        Some((whole, fraction)) => (whole, Some(fraction)),
        None => (text, None),
    };
    let digits = |part: &str| part.bytes().all(|b| b.is_ascii_digit());
    if !digits(whole) || fraction.is_some_and(|fraction| fraction.is_empty() || !digits(fraction)) {
        return Err(Problem::Malformed);
    }
    if whole.is_empty() && fraction.is_none() {
        return Err(Problem::Malformed);
    }
    let fraction = fraction.unwrap_or("").trim_end_matches('0');
    if fraction.len() > 3 {
        return Err(Problem::TooManyDecimals);
    }
    let mut value: u64 = 0;
    for b in whole.bytes() {
        value = value
            .checked_mul(10)
            .and_then(|v| v.checked_add(u64::from(b - b'0')))
            .ok_or(Problem::TooLarge)?;
    }
    let mut millis: u64 = 0;
    for (index, b) in fraction.bytes().enumerate() {
        millis += u64::from(b - b'0') * 10u64.pow(2 - index as u32);
    }
    value
        .checked_mul(1000)
        .and_then(|v| v.checked_add(millis))
        .ok_or(Problem::TooLarge)
}

/// Renders thousandths as the shortest decimal: 500 → `0.5`, 2000 → `2`, 1250 → `1.25`.
pub(crate) fn decimal(thousandths: u64) -> String {
    let whole = thousandths / 1000;
    let fraction = thousandths % 1000;
    if fraction == 0 {
        whole.to_string()
    } else {
        let fraction = format!("{fraction:03}");
        format!("{whole}.{}", fraction.trim_end_matches('0'))
    }
}

/// The characters that separate a request from a limit: `~`, cube-studio's `-` and `_`, and the full-width `～`.
const SEPARATORS: [char; 4] = ['~', '-', '_', '～'];

/// Splits `request~limit` into its trimmed halves; a text without separator is a plain value.
pub(crate) fn range(text: &str) -> Result<(Option<&str>, &str), Problem> {
    let text = text.trim();
    if text.starts_with('-') {
        return Err(Problem::Negative);
    }
    let Some((index, separator)) = text.char_indices().find(|(_, c)| SEPARATORS.contains(c)) else {
        return Ok((None, text));
    };
    let request = text[..index].trim();
    let limit = text[index + separator.len_utf8()..].trim();
    if limit.starts_with('-') {
        return Err(Problem::Negative);
    }
    if request.is_empty() || limit.is_empty() || limit.contains(SEPARATORS) {
        return Err(Problem::Malformed);
    }
    Ok((Some(request), limit))
}

/// Whether `word` can be a node label value: 1 to 63 ASCII letters, digits, '-', '_' or '.', alphanumeric at
/// both ends.
pub(crate) fn label_word(word: &str) -> bool {
    let bytes = word.as_bytes();
    (1..=63).contains(&bytes.len())
        && bytes[0].is_ascii_alphanumeric()
        && bytes[bytes.len() - 1].is_ascii_alphanumeric()
        && bytes
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thousandths_of_decimals() {
        for (text, expected) in [
            ("0", Ok(0)),
            ("2", Ok(2000)),
            ("0.5", Ok(500)),
            (".5", Ok(500)),
            ("1.250", Ok(1250)),
            ("0.5000", Ok(500)),
            ("007", Ok(7000)),
            ("0.001", Ok(1)),
            ("0.0001", Err(Problem::TooManyDecimals)),
            ("5.", Err(Problem::Malformed)),
            (".", Err(Problem::Malformed)),
            ("", Err(Problem::Malformed)),
            ("-1", Err(Problem::Negative)),
            ("+1", Err(Problem::Malformed)),
            ("1e3", Err(Problem::Malformed)),
            ("NaN", Err(Problem::Malformed)),
            ("inf", Err(Problem::Malformed)),
            ("1.2.3", Err(Problem::Malformed)),
            ("١", Err(Problem::Malformed)),
            ("18446744073709552", Err(Problem::TooLarge)),
            ("18446744073709551615", Err(Problem::TooLarge)),
        ] {
            assert_eq!(thousandths(text), expected, "{text:?}");
        }
    }

    #[test]
    fn decimals_render_short() {
        for (value, text) in [
            (0, "0"),
            (500, "0.5"),
            (2000, "2"),
            (1250, "1.25"),
            (1, "0.001"),
            (10, "0.01"),
        ] {
            assert_eq!(decimal(value), text);
        }
    }
}
