//! GPU strings: `1`, `2(T4)`, `1(nvidia,V100)`, `0.25`.

use std::fmt;
use std::str::FromStr;

use crate::error::{ParseError, Problem, ResourceKind};
use crate::number::{decimal, label_word, thousandths};

/// Holds the GPUs a container asks for: none, whole GPUs, or a share of one (vGPU).
///
/// Vendors are lower-case and types upper-case; both are node-label words. Which resource a vendor means is the
/// scheduler's configuration, not the grammar's.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub enum GpuSpec {
    /// No GPU: `0` or the empty string.
    #[default]
    None,
    /// Whole GPUs: `2`, `2(T4)`, `1(nvidia,V100)`.
    Whole {
        /// How many, at least 1.
        count: u32,
        /// The vendor, when named as `(vendor,type)`.
        vendor: Option<String>,
        /// The type (`gpu-type` node label), when named.
        gpu_type: Option<String>,
    },
    /// A share of one GPU: `0.25`, `0.5(T4)`.
    Fraction {
        /// The share in thousandths, 1 to 999: `0.25` is 250.
        share_thousandths: u32,
        /// The vendor, when named as `(vendor,type)`.
        vendor: Option<String>,
        /// The type (`gpu-type` node label), when named.
        gpu_type: Option<String>,
    },
}

impl GpuSpec {
    /// Returns the vendor, when one is named.
    pub fn vendor(&self) -> Option<&str> {
        match self {
            Self::None => None,
            Self::Whole { vendor, .. } | Self::Fraction { vendor, .. } => vendor.as_deref(),
        }
    }

    /// Returns the GPU type, when one is named.
    pub fn gpu_type(&self) -> Option<&str> {
        match self {
            Self::None => None,
            Self::Whole { gpu_type, .. } | Self::Fraction { gpu_type, .. } => gpu_type.as_deref(),
        }
    }

    /// Returns the amount in thousandths of a GPU: 2 GPUs are 2000, `0.25` is 250, none is 0.
    pub fn thousandths(&self) -> u64 {
        match self {
            Self::None => 0,
            Self::Whole { count, .. } => u64::from(*count) * 1000,
            Self::Fraction { share_thousandths, .. } => u64::from(*share_thousandths),
        }
    }

    /// Checks a spec built by hand against the rules the parser enforces.
    ///
    /// # Errors
    /// Returns the error parsing its text would give: a count of 0, a share outside 1 to 999 thousandths, a
    /// vendor or type that is not a lower-case or upper-case node-label word.
    pub fn validate(&self) -> Result<(), ParseError> {
        let fail = |problem| Err(ParseError::new(ResourceKind::Gpu, &self.to_string(), problem));
        let (vendor, gpu_type) = match self {
            Self::None => return Ok(()),
            Self::Whole { count: 0, .. }
            | Self::Fraction {
                share_thousandths: 0, ..
            } => {
                return fail(if self.vendor().is_some() || self.gpu_type().is_some() {
                    Problem::QualifierWithoutGpu
                } else {
                    Problem::Zero
                });
            }
            Self::Fraction {
                share_thousandths: 1000..,
                ..
            } => return fail(Problem::NotWholeGpu),
            Self::Whole { vendor, gpu_type, .. } | Self::Fraction { vendor, gpu_type, .. } => (vendor, gpu_type),
        };
        if let Some(vendor) = vendor
            && (!label_word(vendor) || vendor.to_ascii_lowercase() != *vendor)
        {
            return fail(Problem::BadVendor(vendor.clone()));
        }
        if let Some(gpu_type) = gpu_type
            && (!label_word(gpu_type) || gpu_type.to_ascii_uppercase() != *gpu_type)
        {
            return fail(Problem::BadGpuType(gpu_type.clone()));
        }
        Ok(())
    }
}

/// Splits `count(qualifier)` into the count and the words inside the parentheses.
fn split(text: &str) -> Result<(&str, Option<&str>), Problem> {
    match text.split_once('(') {
        None if text.contains(')') => Err(Problem::Malformed),
        None => Ok((text.trim(), None)),
        Some((count, rest)) => {
            let inner = rest.trim_end().strip_suffix(')').ok_or(Problem::Malformed)?;
            if inner.contains(['(', ')']) {
                return Err(Problem::Malformed);
            }
            Ok((count.trim(), Some(inner)))
        }
    }
}

/// Reads `type` or `vendor,type` (the type may be empty after a vendor: `vendor,`).
fn qualifier(inner: &str) -> Result<(Option<String>, Option<String>), Problem> {
    let mut words = inner.split(',').map(str::trim);
    let first = words.next().unwrap_or_default();
    let second = words.next();
    if words.next().is_some() {
        return Err(Problem::Malformed);
    }
    let gpu_type = |word: &str| {
        if label_word(word) {
            Ok(word.to_ascii_uppercase())
        } else {
            Err(Problem::BadGpuType(word.to_owned()))
        }
    };
    match second {
        None => Ok((None, Some(gpu_type(first)?))),
        Some(second) => {
            if !label_word(first) {
                return Err(Problem::BadVendor(first.to_owned()));
            }
            let second = if second.is_empty() {
                None
            } else {
                Some(gpu_type(second)?)
            };
            Ok((Some(first.to_ascii_lowercase()), second))
        }
    }
}

impl FromStr for GpuSpec {
    type Err = ParseError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let fail = |problem| ParseError::new(ResourceKind::Gpu, text, problem);
        let normal: String = text
            .chars()
            .map(|c| match c {
                '（' => '(',
                '）' => ')',
                '，' => ',',
                c => c,
            })
            .collect();
        let normal = normal.trim();
        if normal.is_empty() {
            return Ok(Self::None);
        }
        let (count, inner) = split(normal).map_err(fail)?;
        let amount = thousandths(count).map_err(fail)?;
        let (vendor, gpu_type) = match inner {
            Some(inner) => qualifier(inner).map_err(fail)?,
            None => (None, None),
        };
        if amount == 0 {
            return match inner {
                Some(_) => Err(fail(Problem::QualifierWithoutGpu)),
                None => Ok(Self::None),
            };
        }
        if amount < 1000 {
            let share_thousandths = u32::try_from(amount).map_err(|_| fail(Problem::TooLarge))?;
            return Ok(Self::Fraction {
                share_thousandths,
                vendor,
                gpu_type,
            });
        }
        if amount % 1000 != 0 {
            return Err(fail(Problem::NotWholeGpu));
        }
        let count = u32::try_from(amount / 1000).map_err(|_| fail(Problem::TooLarge))?;
        Ok(Self::Whole {
            count,
            vendor,
            gpu_type,
        })
    }
}

impl fmt::Display for GpuSpec {
    /// Renders the canonical form: `0`, `2`, `2(T4)`, `1(nvidia,V100)`, `1(nvidia,)`, `0.25`, `0.5(T4)`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (vendor, gpu_type) = match self {
            Self::None => return f.write_str("0"),
            Self::Whole {
                count,
                vendor,
                gpu_type,
            } => {
                write!(f, "{count}")?;
                (vendor, gpu_type)
            }
            Self::Fraction {
                share_thousandths,
                vendor,
                gpu_type,
            } => {
                f.write_str(&decimal(u64::from(*share_thousandths)))?;
                (vendor, gpu_type)
            }
        };
        match (vendor, gpu_type) {
            (None, None) => Ok(()),
            (None, Some(gpu_type)) => write!(f, "({gpu_type})"),
            (Some(vendor), gpu_type) => write!(f, "({vendor},{})", gpu_type.as_deref().unwrap_or_default()),
        }
    }
}
