//! The size of a memory-backed volume, `4G` in `4G(memory):/dev/shm`.

use std::fmt;
use std::str::FromStr;

use crate::error::{MemorySizeProblem, VolumeErrorReason};

/// The accepted units with their power of 1024; both spellings are binary, as in cube-studio (`4G` became
/// `sizeLimit: 4Gi`).
const UNITS: [(&str, u32); 8] = [
    ("K", 1),
    ("M", 2),
    ("G", 3),
    ("T", 4),
    ("Ki", 1),
    ("Mi", 2),
    ("Gi", 3),
    ("Ti", 4),
];

/// Holds the size limit of a memory-backed volume: a whole number above 0 with a unit.
///
/// Units are `K`, `M`, `G`, `T` and `Ki`, `Mi`, `Gi`, `Ti`, all binary: cube-studio turned `4G` into the
/// Kubernetes quantity `4Gi`, so `4G` and `4Gi` have the same [`bytes`](Self::bytes). The text is kept as written,
/// so a size renders back exactly as it was accepted; equality compares that text.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct MemorySize {
    text: String,
    bytes: u64,
}

impl MemorySize {
    /// Returns the size as it was written, e.g. `4G`.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// Returns the size in bytes, e.g. 4294967296 for `4G`.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Returns the size as a Kubernetes quantity with a binary unit, e.g. `4Gi` for both `4G` and `4Gi`.
    pub fn quantity(&self) -> String {
        if self.text.ends_with('i') {
            self.text.clone()
        } else {
            format!("{}i", self.text)
        }
    }
}

impl FromStr for MemorySize {
    type Err = VolumeErrorReason;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let invalid = |problem| VolumeErrorReason::InvalidMemorySize {
            size: text.to_owned(),
            problem,
        };
        let bytes = size_in_bytes(text).map_err(invalid)?;
        Ok(Self {
            text: text.to_owned(),
            bytes,
        })
    }
}

impl fmt::Display for MemorySize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

/// Checks a size and computes its bytes.
fn size_in_bytes(text: &str) -> Result<u64, MemorySizeProblem> {
    if text.is_empty() {
        return Err(MemorySizeProblem::Empty);
    }
    let digits_end = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
    let (digits, unit) = text.split_at(digits_end);
    if unit.starts_with(['.', ',']) {
        return Err(MemorySizeProblem::Fraction);
    }
    if digits.is_empty() {
        return Err(MemorySizeProblem::NotANumber);
    }
    if digits.bytes().all(|b| b == b'0') {
        return Err(MemorySizeProblem::Zero);
    }
    if digits.starts_with('0') {
        return Err(MemorySizeProblem::LeadingZero);
    }
    if unit.is_empty() {
        return Err(MemorySizeProblem::MissingUnit);
    }
    let Some(&(_, power)) = UNITS.iter().find(|(name, _)| *name == unit) else {
        return Err(MemorySizeProblem::UnknownUnit { unit: unit.to_owned() });
    };
    let number: u64 = digits.parse().map_err(|_| MemorySizeProblem::TooLarge)?;
    number
        .checked_mul(1024u64.pow(power))
        .ok_or(MemorySizeProblem::TooLarge)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn problem(text: &str) -> Option<MemorySizeProblem> {
        match text.parse::<MemorySize>() {
            Ok(_) => None,
            Err(VolumeErrorReason::InvalidMemorySize { size, problem }) => {
                assert_eq!(size, text);
                Some(problem)
            }
            Err(other) => panic!("unexpected reason {other:?}"),
        }
    }

    #[test]
    fn units_are_binary_in_both_spellings() -> Result<(), VolumeErrorReason> {
        for (text, bytes, quantity) in [
            ("1K", 1024, "1Ki"),
            ("512M", 512 << 20, "512Mi"),
            ("4G", 4 << 30, "4Gi"),
            ("4Gi", 4 << 30, "4Gi"),
            ("2T", 2 << 40, "2Ti"),
            ("3Ti", 3 << 40, "3Ti"),
            ("10Ki", 10 << 10, "10Ki"),
            ("7Mi", 7 << 20, "7Mi"),
        ] {
            let size: MemorySize = text.parse()?;
            assert_eq!(size.bytes(), bytes, "{text}");
            assert_eq!(size.quantity(), quantity, "{text}");
            assert_eq!(size.to_string(), text);
            assert_eq!(size.as_str(), text);
        }
        Ok(())
    }

    #[test]
    fn same_bytes_different_text_are_different_values() -> Result<(), VolumeErrorReason> {
        let g: MemorySize = "4G".parse()?;
        let gi: MemorySize = "4Gi".parse()?;
        assert_eq!(g.bytes(), gi.bytes());
        assert_ne!(g, gi);
        Ok(())
    }

    #[test]
    fn bad_sizes_say_what_is_wrong() {
        assert_eq!(problem(""), Some(MemorySizeProblem::Empty));
        assert_eq!(problem("G"), Some(MemorySizeProblem::NotANumber));
        assert_eq!(problem("-4G"), Some(MemorySizeProblem::NotANumber));
        assert_eq!(problem("4.5G"), Some(MemorySizeProblem::Fraction));
        assert_eq!(problem(".5G"), Some(MemorySizeProblem::Fraction));
        assert_eq!(problem("0G"), Some(MemorySizeProblem::Zero));
        assert_eq!(problem("000Mi"), Some(MemorySizeProblem::Zero));
        assert_eq!(problem("04G"), Some(MemorySizeProblem::LeadingZero));
        assert_eq!(problem("4096"), Some(MemorySizeProblem::MissingUnit));
        assert_eq!(problem("4g"), Some(MemorySizeProblem::UnknownUnit { unit: "g".into() }));
        assert_eq!(
            problem("4GB"),
            Some(MemorySizeProblem::UnknownUnit { unit: "GB".into() })
        );
        assert_eq!(problem("4E"), Some(MemorySizeProblem::UnknownUnit { unit: "E".into() }));
        assert_eq!(problem("16777216T"), Some(MemorySizeProblem::TooLarge));
        assert_eq!(problem("99999999999999999999999G"), Some(MemorySizeProblem::TooLarge));
        assert_eq!(problem("16777215T"), None);
    }
}
