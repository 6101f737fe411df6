//! Kubernetes quantities: rendering requests and limits, and reading nodes' allocatable amounts.

/// Renders millicores as a Kubernetes CPU quantity: 2000 → `2`, 500 → `500m`.
pub fn cpu(millis: u64) -> String {
    if millis.is_multiple_of(1000) {
        (millis / 1000).to_string()
    } else {
        format!("{millis}m")
    }
}

/// Renders bytes as a Kubernetes memory quantity in the largest binary unit that divides them: 4 GiB → `4Gi`,
/// 1536 MiB → `1536Mi`, 1000 → `1000`.
pub fn memory(bytes: u64) -> String {
    if bytes == 0 {
        return "0".into();
    }
    for (unit, power) in [("Ei", 6), ("Pi", 5), ("Ti", 4), ("Gi", 3), ("Mi", 2), ("Ki", 1)] {
        let size = 1u64 << (10 * power);
        if bytes.is_multiple_of(size) {
            return format!("{}{unit}", bytes / size);
        }
    }
    bytes.to_string()
}

/// Parses a Kubernetes quantity into thousandths of its unit, rounded down: `3900m` → 3900, `32` → 32000,
/// `16Ki` → 16384000, `1.5` → 1500, `1e3` → 1000000.
///
/// Returns `None` for text that is not a non-negative quantity or does not fit. Thousandths make CPU quantities
/// millicores; divide by 1000 for bytes and device counts.
pub fn parse_milli(text: &str) -> Option<u128> {
    let text = text.trim();
    let text = text.strip_prefix('+').unwrap_or(text);
    let end = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, suffix) = text.split_at(end);
    let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
    if whole.is_empty() && fraction.is_empty() || fraction.contains('.') {
        return None;
    }
    let mantissa: u128 = format!("{whole}{fraction}").parse().ok()?;
    // value = mantissa × numerator / denominator, where the denominator carries the decimals.
    let mut numerator: u128 = 1000;
    let mut denominator: u128 = 10u128.checked_pow(u32::try_from(fraction.len()).ok()?)?;
    let decimal = |exponent: u32| 10u128.checked_pow(exponent);
    match suffix {
        "" => {}
        "n" => denominator = denominator.checked_mul(decimal(9)?)?,
        "u" => denominator = denominator.checked_mul(decimal(6)?)?,
        "m" => denominator = denominator.checked_mul(decimal(3)?)?,
        "k" => numerator *= decimal(3)?,
        "M" => numerator *= decimal(6)?,
        "G" => numerator *= decimal(9)?,
        "T" => numerator *= decimal(12)?,
        "P" => numerator *= decimal(15)?,
        "E" => numerator *= decimal(18)?,
        "Ki" => numerator <<= 10,
        "Mi" => numerator <<= 20,
        "Gi" => numerator <<= 30,
        "Ti" => numerator <<= 40,
        "Pi" => numerator <<= 50,
        "Ei" => numerator <<= 60,
        exponent => {
            let exponent = exponent.strip_prefix(['e', 'E'])?;
            let (negative, digits) = match exponent.strip_prefix('-') {
                Some(digits) => (true, digits),
                None => (false, exponent.strip_prefix('+').unwrap_or(exponent)),
            };
            if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            let power = decimal(digits.parse().ok()?)?;
            if negative {
                denominator = denominator.checked_mul(power)?;
            } else {
                numerator = numerator.checked_mul(power)?;
            }
        }
    }
    Some(mantissa.checked_mul(numerator)? / denominator)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_cpu_and_memory() {
        assert_eq!(cpu(2000), "2");
        assert_eq!(cpu(500), "500m");
        assert_eq!(cpu(0), "0");
        assert_eq!(cpu(1250), "1250m");
        assert_eq!(memory(4 << 30), "4Gi");
        assert_eq!(memory(1536 << 20), "1536Mi");
        assert_eq!(memory(1 << 40), "1Ti");
        assert_eq!(memory(0), "0");
        assert_eq!(memory(1000), "1000");
        assert_eq!(memory(2048), "2Ki");
    }

    #[test]
    fn parses_quantities() {
        for (text, expected) in [
            ("3900m", Some(3900)),
            ("32", Some(32000)),
            ("0.5", Some(500)),
            ("1.5", Some(1500)),
            (".5", Some(500)),
            ("16Ki", Some(16 * 1024 * 1000)),
            ("263597696Ki", Some(263_597_696 * 1024 * 1000)),
            ("4Gi", Some((4u128 << 30) * 1000)),
            ("4G", Some(4_000_000_000_000)),
            ("1k", Some(1_000_000)),
            ("1e3", Some(1_000_000)),
            ("1E-3", Some(1)),
            ("100u", Some(0)),
            ("1500000n", Some(1)),
            ("+2", Some(2000)),
            ("-1", None),
            ("", None),
            ("abc", None),
            ("1.2.3", None),
            ("4GB", None),
            ("1e", None),
            ("1e999", None),
        ] {
            assert_eq!(parse_milli(text), expected, "{text:?}");
        }
    }
}
