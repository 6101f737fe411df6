//! CPU strings: `2`, `0.5`, `1~4`.

use std::fmt;
use std::str::FromStr;

use crate::error::{ParseError, Problem, ResourceKind};
use crate::number::{decimal, range, thousandths};

/// Holds a CPU request and limit in millicores; the limit is above 0 and the request at most the limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CpuSpec {
    request_millis: u64,
    limit_millis: u64,
}

impl CpuSpec {
    /// Builds a spec of `request_millis` requested and `limit_millis` as the limit.
    ///
    /// # Errors
    /// Returns an error when the limit is 0 or the request is above the limit.
    pub fn new(request_millis: u64, limit_millis: u64) -> Result<Self, ParseError> {
        let spec = Self {
            request_millis,
            limit_millis,
        };
        let problem = if limit_millis == 0 {
            Problem::Zero
        } else if request_millis > limit_millis {
            Problem::RequestAboveLimit
        } else {
            return Ok(spec);
        };
        let text = format!("{}~{}", decimal(request_millis), decimal(limit_millis));
        Err(ParseError::new(ResourceKind::Cpu, &text, problem))
    }

    /// Builds a spec whose request and limit are both `millis`.
    ///
    /// # Errors
    /// Returns an error when `millis` is 0.
    pub fn exact(millis: u64) -> Result<Self, ParseError> {
        Self::new(millis, millis)
    }

    /// Returns the request in millicores.
    pub fn request_millis(&self) -> u64 {
        self.request_millis
    }

    /// Returns the limit in millicores.
    pub fn limit_millis(&self) -> u64 {
        self.limit_millis
    }
}

impl FromStr for CpuSpec {
    type Err = ParseError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let fail = |problem| ParseError::new(ResourceKind::Cpu, text, problem);
        if text.trim().is_empty() {
            return Err(fail(Problem::Empty));
        }
        let value = |part: &str| {
            if part.ends_with('m') && thousandths(&part[..part.len() - 1]).is_ok() {
                return Err(Problem::Millicores);
            }
            thousandths(part)
        };
        let (request, limit) = range(text).map_err(fail)?;
        let limit = value(limit).map_err(fail)?;
        let request = match request {
            Some(request) => value(request).map_err(fail)?,
            None => limit,
        };
        if limit == 0 {
            return Err(fail(Problem::Zero));
        }
        if request > limit {
            return Err(fail(Problem::RequestAboveLimit));
        }
        Ok(Self {
            request_millis: request,
            limit_millis: limit,
        })
    }
}

impl fmt::Display for CpuSpec {
    /// Renders the canonical form: `2`, `0.5`, or `1~4` when request and limit differ.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.request_millis == self.limit_millis {
            f.write_str(&decimal(self.limit_millis))
        } else {
            write!(f, "{}~{}", decimal(self.request_millis), decimal(self.limit_millis))
        }
    }
}
