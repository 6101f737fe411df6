//! The parsers on generated input: no text makes them panic, and every valid spec survives Display → FromStr.

use cube_resources::{CpuSpec, GpuSpec, MemorySpec};
use proptest::prelude::*;

/// Text that looks like resource strings more often than arbitrary text does.
fn resourceish() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<String>(),
        "[0-9.~_ -]{0,12}",
        "[0-9.]{0,6}[mMgGtTiKk]{0,3}([~_-][0-9.]{0,6}[mMgGtTi]{0,2})?",
        "[0-9.]{0,6}[(（][a-zA-Z0-9,， .-]{0,12}[)）]?",
    ]
}

fn cpu_spec() -> impl Strategy<Value = CpuSpec> {
    (0u64..=100_000_000, 1u64..=100_000_000).prop_filter_map("request above limit", |(request, limit)| {
        CpuSpec::new(request.min(limit), limit).ok()
    })
}

fn memory_spec() -> impl Strategy<Value = MemorySpec> {
    let amount = (0u64..=4096, prop::sample::select(vec![1u64 << 20, 1 << 30, 1 << 40]))
        .prop_map(|(number, unit)| number * unit);
    (amount.clone(), amount).prop_filter_map("zero limit", |(a, b)| MemorySpec::new(a.min(b), a.max(b)).ok())
}

fn word() -> impl Strategy<Value = String> {
    "[a-zA-Z0-9]([a-zA-Z0-9._-]{0,10}[a-zA-Z0-9])?"
}

fn vendor() -> impl Strategy<Value = Option<String>> {
    prop::option::of(word().prop_map(|word| word.to_ascii_lowercase()))
}

fn gpu_type() -> impl Strategy<Value = Option<String>> {
    prop::option::of(word().prop_map(|word| word.to_ascii_uppercase()))
}

fn gpu_spec() -> impl Strategy<Value = GpuSpec> {
    prop_oneof![
        Just(GpuSpec::None),
        (1u32..=u32::MAX, vendor(), gpu_type()).prop_map(|(count, vendor, gpu_type)| {
            GpuSpec::Whole {
                count,
                vendor,
                gpu_type,
            }
        }),
        (1u32..=999, vendor(), gpu_type()).prop_map(|(share_thousandths, vendor, gpu_type)| GpuSpec::Fraction {
            share_thousandths,
            vendor,
            gpu_type,
        }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn arbitrary_text_never_panics(text in resourceish()) {
        for parsed in [
            text.parse::<CpuSpec>().map(|spec| spec.to_string()),
            text.parse::<MemorySpec>().map(|spec| spec.to_string()),
            text.parse::<GpuSpec>().map(|spec| spec.to_string()),
        ] {
            match parsed {
                Ok(canonical) => prop_assert!(!canonical.is_empty()),
                Err(error) => prop_assert!(error.to_string().contains("expected")),
            }
        }
    }

    #[test]
    fn accepted_text_is_canonical_after_one_round(text in resourceish()) {
        if let Ok(spec) = text.parse::<CpuSpec>() {
            prop_assert_eq!(spec.to_string().parse::<CpuSpec>(), Ok(spec));
        }
        if let Ok(spec) = text.parse::<MemorySpec>() {
            prop_assert_eq!(spec.to_string().parse::<MemorySpec>(), Ok(spec));
        }
        if let Ok(spec) = text.parse::<GpuSpec>() {
            prop_assert_eq!(spec.to_string().parse::<GpuSpec>(), Ok(spec.clone()));
            prop_assert_eq!(spec.validate(), Ok(()));
        }
    }

    #[test]
    fn cpu_round_trips(spec in cpu_spec()) {
        prop_assert_eq!(spec.to_string().parse::<CpuSpec>(), Ok(spec));
    }

    #[test]
    fn memory_round_trips(spec in memory_spec()) {
        prop_assert_eq!(spec.to_string().parse::<MemorySpec>(), Ok(spec));
    }

    #[test]
    fn gpu_round_trips(spec in gpu_spec()) {
        prop_assert_eq!(spec.validate(), Ok(()));
        prop_assert_eq!(spec.to_string().parse::<GpuSpec>(), Ok(spec));
    }

    #[test]
    fn quantities_never_panic(text in resourceish()) {
        let _ = cube_resources::quantity::parse_milli(&text);
    }
}
