//! Properties of parsing and rendering: no input panics, valid mounts round-trip, and rendering is a fixed point.

use std::collections::HashSet;

use cube_volumes::{ACCEPTED_FORMS, MemorySize, VolumeMount, VolumeSource, parse, render, validate};
use proptest::prelude::*;
use proptest::strategy::ValueTree;

/// What `render(&parse(text)?)` must give: entries trimmed, empty ones dropped, joined with ','.
fn normalised(text: &str) -> String {
    text.split([',', ';'])
        .map(str::trim)
        .filter(|entry| !entry.is_empty())
        .collect::<Vec<_>>()
        .join(",")
}

/// Checks what holds for any text: accepted text renders back normalised, refused text is explained.
fn check_any(text: &str) -> Result<(), TestCaseError> {
    match parse(text) {
        Ok(mounts) => {
            prop_assert_eq!(render(&mounts), normalised(text));
            prop_assert_eq!(validate(&mounts), Ok(()));
        }
        Err(error) => {
            let message = error.to_string();
            prop_assert!(message.contains(ACCEPTED_FORMS));
            let piece = text.split([',', ';']).nth(error.entry_index()).map(str::trim);
            prop_assert_eq!(piece, Some(error.entry()));
            prop_assert!(!error.entry().is_empty());
        }
    }
    Ok(())
}

/// Text built from the grammar's pieces, so that a good share of it parses: valid entries, valid entries with one
/// character deleted or inserted, and junk from the grammar's characters, between noisy separators.
fn grammatical() -> impl Strategy<Value = String> {
    let valid =
        || (source(), path(true)).prop_map(|(source, mount_path)| VolumeMount { source, mount_path }.to_string());
    let entry = prop_oneof![
        3 => valid(),
        1 => (valid(), any::<prop::sample::Index>()).prop_map(|(entry, at)| {
            let mut chars: Vec<char> = entry.chars().collect();
            chars.remove(at.index(chars.len()));
            chars.into_iter().collect::<String>()
        }),
        1 => (valid(), any::<prop::sample::Index>(), "[a-zA-Z0-9()/:. _-]").prop_map(|(entry, at, insert)| {
            let mut chars: Vec<char> = entry.chars().collect();
            let at = at.index(chars.len() + 1);
            chars.splice(at..at, insert.chars());
            chars.into_iter().collect::<String>()
        }),
        1 => "[a-z0-9()/:.\\-]{0,20}",
    ];
    (
        prop::collection::vec((entry, "[ \t]{0,1}[,;]{1,2}[ \t]{0,1}"), 0..4),
        "[ ]{0,1}",
    )
        .prop_map(|(entries, end)| {
            let mut text = String::new();
            for (entry, separator) in entries {
                text.push_str(&entry);
                text.push_str(&separator);
            }
            text.push_str(&end);
            text
        })
}

fn name() -> impl Strategy<Value = String> {
    "[a-z0-9]([a-z0-9-]{0,6}[a-z0-9])?(\\.[a-z0-9]([a-z0-9-]{0,6}[a-z0-9])?){0,2}"
}

/// Absolute paths of 1 to 4 segments, possibly with a trailing '/'; segments never are '.' or '..'.
fn path(parentheses: bool) -> impl Strategy<Value = String> {
    let segment = if parentheses {
        "[A-Za-z0-9_é数@+=()-][A-Za-z0-9_.é数@+=()-]{0,8}"
    } else {
        "[A-Za-z0-9_é数@+=-][A-Za-z0-9_.é数@+=-]{0,8}"
    };
    (prop::collection::vec(segment, 1..4), any::<bool>()).prop_map(|(segments, trailing)| {
        let mut path = format!("/{}", segments.join("/"));
        if trailing {
            path.push('/');
        }
        path
    })
}

fn memory_size() -> impl Strategy<Value = MemorySize> {
    (
        "[1-9][0-9]{0,3}",
        prop::sample::select(vec!["K", "M", "G", "T", "Ki", "Mi", "Gi", "Ti"]),
    )
        .prop_filter_map("size is valid", |(number, unit)| format!("{number}{unit}").parse().ok())
}

fn source() -> impl Strategy<Value = VolumeSource> {
    prop_oneof![
        name().prop_map(|claim| VolumeSource::Pvc { claim }),
        name().prop_map(|claim| VolumeSource::PvcShare { claim }),
        name().prop_map(|claim| VolumeSource::Storage { claim }),
        prop_oneof![Just("/".to_owned()), path(false)].prop_map(|path| VolumeSource::HostPath { path }),
        name().prop_map(|name| VolumeSource::ConfigMap { name }),
        name().prop_map(|name| VolumeSource::Secret { name }),
        memory_size().prop_map(|size| VolumeSource::Memory { size }),
    ]
}

/// Valid settings: valid mounts, none sharing a mount path.
fn mounts() -> impl Strategy<Value = Vec<VolumeMount>> {
    prop::collection::vec((source(), path(true)), 0..6).prop_map(|pairs| {
        let mut seen = HashSet::new();
        pairs
            .into_iter()
            .map(|(source, mount_path)| VolumeMount { source, mount_path })
            .filter(|mount| seen.insert(mount.normalized_mount_path().to_owned()))
            .collect()
    })
}

proptest! {
    #[test]
    fn arbitrary_unicode_never_panics(text in any::<String>()) {
        check_any(&text)?;
    }

    #[test]
    fn grammar_characters_never_panic(text in "[a-z0-9()/:;,.\\- G]{0,80}") {
        check_any(&text)?;
    }

    #[test]
    fn grammatical_text_never_panics(text in grammatical()) {
        check_any(&text)?;
    }

    #[test]
    fn valid_mounts_round_trip(mounts in mounts()) {
        prop_assert_eq!(validate(&mounts), Ok(()));
        let text = render(&mounts);
        prop_assert_eq!(parse(&text), Ok(mounts.clone()));
        for mount in &mounts {
            prop_assert_eq!(mount.to_string().parse::<VolumeMount>(), Ok(mount.clone()));
        }
    }

    #[test]
    fn rendering_parsed_text_is_a_fixed_point(text in prop_oneof![grammatical(), any::<String>()]) {
        if let Ok(mounts) = parse(&text) {
            prop_assert_eq!(parse(&render(&mounts)), Ok(mounts));
        }
    }

    #[test]
    fn valid_settings_survive_separator_and_whitespace_noise(
        mounts in mounts(),
        noise in prop::collection::vec("[ \t\n]{0,2}[,;]{1,2}[ \t\n]{0,2}", 6),
    ) {
        let mut text = noise[5].clone();
        for (mount, separator) in mounts.iter().zip(&noise) {
            text.push_str(&mount.to_string());
            text.push_str(separator);
        }
        prop_assert_eq!(parse(&text), Ok(mounts.clone()));
        prop_assert_eq!(render(&mounts), normalised(&text));
    }
}

#[test]
fn the_grammatical_strategy_reaches_accepted_text() {
    // Guards the property tests against a generator that only ever produces refused text.
    let mut runner = proptest::test_runner::TestRunner::deterministic();
    let strategy = grammatical();
    let accepted = (0..500)
        .filter_map(|_| strategy.new_tree(&mut runner).ok())
        .filter(|tree| parse(&tree.current()).is_ok_and(|mounts| !mounts.is_empty()))
        .count();
    assert!(accepted >= 100, "only {accepted} of 500 generated settings parsed");
}
