//! Memory strings: `4G`, `512M`, `2G~8G`.

use std::fmt;
use std::str::FromStr;

use crate::error::{ParseError, Problem, ResourceKind};
use crate::number::{range, thousandths};

/// One mebibyte, the smallest unit of the grammar.
const MIB: u64 = 1 << 20;

/// The units, largest first, with the canonical spelling.
const UNITS: [(&str, u64); 3] = [("T", 1 << 40), ("G", 1 << 30), ("M", MIB)];

/// Holds a memory request and limit in bytes; the limit is above 0, the request at most the limit, and both are
/// whole mebibytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct MemorySpec {
    request_bytes: u64,
    limit_bytes: u64,
}

impl MemorySpec {
    /// Builds a spec of `request_bytes` requested and `limit_bytes` as the limit.
    ///
    /// # Errors
    /// Returns an error when the limit is 0, the request is above the limit or either is not whole mebibytes.
    pub fn new(request_bytes: u64, limit_bytes: u64) -> Result<Self, ParseError> {
        let spec = Self {
            request_bytes,
            limit_bytes,
        };
        let problem = if limit_bytes == 0 {
            Problem::Zero
        } else if request_bytes > limit_bytes {
            Problem::RequestAboveLimit
        } else if !request_bytes.is_multiple_of(MIB) || !limit_bytes.is_multiple_of(MIB) {
            Problem::FractionalMemory
        } else {
            return Ok(spec);
        };
        let text = format!("{request_bytes} bytes~{limit_bytes} bytes");
        Err(ParseError::new(ResourceKind::Memory, &text, problem))
    }

    /// Builds a spec whose request and limit are both `bytes`.
    ///
    /// # Errors
    /// Returns an error when `bytes` is 0 or not whole mebibytes.
    pub fn exact(bytes: u64) -> Result<Self, ParseError> {
        Self::new(bytes, bytes)
    }

    /// Returns the request in bytes.
    pub fn request_bytes(&self) -> u64 {
        self.request_bytes
    }

    /// Returns the limit in bytes.
    pub fn limit_bytes(&self) -> u64 {
        self.limit_bytes
    }
}

/// Parses one amount: a whole number with a unit, or a bare 0.
fn bytes(text: &str) -> Result<u64, Problem> {
    let end = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(end);
    let unit = unit.trim();
    if number.is_empty() {
        return Err(Problem::Malformed);
    }
    if number.contains('.') {
        return Err(if thousandths(number).is_ok() {
            Problem::FractionalMemory
        } else {
            Problem::Malformed
        });
    }
    let number: u64 = number.parse().map_err(|_| Problem::TooLarge)?;
    if unit.is_empty() {
        return if number == 0 { Ok(0) } else { Err(Problem::MissingUnit) };
    }
    let multiplier = match unit.to_ascii_lowercase().as_str() {
        "m" | "mi" => MIB,
        "g" | "gi" => 1 << 30,
        "t" | "ti" => 1 << 40,
        _ => return Err(Problem::UnknownUnit(unit.to_owned())),
    };
    number.checked_mul(multiplier).ok_or(Problem::TooLarge)
}

/// Renders bytes in the largest unit that divides them: 4 GiB → `4G`, 1536 MiB → `1536M`, 0 → `0`.
fn render(bytes: u64) -> String {
    if bytes == 0 {
        return "0".into();
    }
    for (unit, size) in UNITS {
        if bytes.is_multiple_of(size) {
            return format!("{}{unit}", bytes / size);
        }
    }
    format!("{bytes}B")
}

impl FromStr for MemorySpec {
    type Err = ParseError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let fail = |problem| ParseError::new(ResourceKind::Memory, text, problem);
        if text.trim().is_empty() {
            return Err(fail(Problem::Empty));
        }
        let (request, limit) = range(text).map_err(fail)?;
        let limit = bytes(limit).map_err(fail)?;
        let request = match request {
            Some(request) => bytes(request).map_err(fail)?,
            None => limit,
        };
        if limit == 0 {
            return Err(fail(Problem::Zero));
        }
        if request > limit {
            return Err(fail(Problem::RequestAboveLimit));
        }
        Ok(Self {
            request_bytes: request,
            limit_bytes: limit,
        })
    }
}

impl fmt::Display for MemorySpec {
    /// Renders the canonical form: `4G`, `512M`, or `2G~8G` when request and limit differ.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.request_bytes == self.limit_bytes {
            f.write_str(&render(self.limit_bytes))
        } else {
            write!(f, "{}~{}", render(self.request_bytes), render(self.limit_bytes))
        }
    }
}
