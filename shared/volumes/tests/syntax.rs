//! The syntax of cube-studio's volume mount settings as Cube accepts, refuses and renders it.

use cube_volumes::{
    ACCEPTED_FORMS, MemorySize, MemorySizeProblem, NameProblem, PathProblem, VolumeError, VolumeErrorReason,
    VolumeMount, VolumeSource, parse, render, validate,
};

/// Parses `text`, which must be refused, and checks what every refusal must say.
fn refused(text: &str) -> VolumeError {
    let error = match parse(text) {
        Ok(mounts) => panic!("{text:?} was accepted as {mounts:?}"),
        Err(error) => error,
    };
    let message = error.to_string();
    assert!(
        message.contains(ACCEPTED_FORMS),
        "message lacks the accepted forms: {message}"
    );
    for form in [
        "name(pvc):/mnt",
        "name(pvc-share):/path",
        "name(storage):/path",
        "/host/path(hostpath):/path",
        "name(configmap):/path",
        "name(secret):/path",
        "4G(memory):/dev/shm",
    ] {
        assert!(message.contains(form), "message lacks {form}: {message}");
    }
    assert!(
        message.contains(&format!("entry {} ", error.entry_index())),
        "message lacks the entry index: {message}"
    );
    let piece = text.split([',', ';']).nth(error.entry_index()).map(str::trim);
    assert_eq!(
        piece,
        Some(error.entry()),
        "entry_index and entry disagree for {text:?}"
    );
    let shown: String = error.entry().chars().take(100).collect();
    assert!(
        message.contains(&format!("{shown:?}")),
        "message lacks the entry text: {message}"
    );
    assert!(message.contains(&error.reason().to_string()));
    error
}

fn mount(source: VolumeSource, mount_path: &str) -> VolumeMount {
    VolumeMount {
        source,
        mount_path: mount_path.to_owned(),
    }
}

fn size(text: &str) -> MemorySize {
    match text.parse() {
        Ok(size) => size,
        Err(error) => panic!("{text:?} is not a size: {error}"),
    }
}

#[test]
fn every_form_of_the_reference_parses_to_its_variant_and_renders_back() -> Result<(), VolumeError> {
    let cases = [
        (
            "kubeflow-user-workspace(pvc):/mnt",
            mount(
                VolumeSource::Pvc {
                    claim: "kubeflow-user-workspace".into(),
                },
                "/mnt",
            ),
        ),
        (
            "shared-data(pvc-share):/data",
            mount(
                VolumeSource::PvcShare {
                    claim: "shared-data".into(),
                },
                "/data",
            ),
        ),
        (
            "cos.bucket-1(storage):/cos",
            mount(
                VolumeSource::Storage {
                    claim: "cos.bucket-1".into(),
                },
                "/cos",
            ),
        ),
        (
            "/data/k8s/kubeflow/global(hostpath):/global",
            mount(
                VolumeSource::HostPath {
                    path: "/data/k8s/kubeflow/global".into(),
                },
                "/global",
            ),
        ),
        (
            "app-config(configmap):/etc/app",
            mount(
                VolumeSource::ConfigMap {
                    name: "app-config".into(),
                },
                "/etc/app",
            ),
        ),
        (
            "hubsecret(secret):/root/.docker",
            mount(
                VolumeSource::Secret {
                    name: "hubsecret".into(),
                },
                "/root/.docker",
            ),
        ),
        (
            "4G(memory):/dev/shm",
            mount(VolumeSource::Memory { size: size("4G") }, "/dev/shm"),
        ),
    ];
    for (text, expected) in cases {
        let one: VolumeMount = text.parse()?;
        assert_eq!(one, expected, "{text}");
        assert_eq!(one.to_string(), text);
        assert_eq!(parse(text)?, vec![expected.clone()]);
        assert_eq!(render(&[expected]), text);
    }
    Ok(())
}

#[test]
fn kinds_are_reported_as_written() -> Result<(), VolumeError> {
    let mounts =
        parse("a(pvc):/a,b(pvc-share):/b,c(storage):/c,/d(hostpath):/d,e(configmap):/e,f(secret):/f,1Mi(memory):/g")?;
    let kinds: Vec<&str> = mounts.iter().map(|m| m.source.kind()).collect();
    assert_eq!(
        kinds,
        [
            "pvc",
            "pvc-share",
            "storage",
            "hostpath",
            "configmap",
            "secret",
            "memory"
        ]
    );
    assert_eq!(mounts[0].source.to_string(), "a(pvc)");
    Ok(())
}

#[test]
fn memory_sizes_keep_their_text_and_count_binary_bytes() -> Result<(), VolumeError> {
    let mounts = parse("512M(memory):/dev/shm;1Gi(memory):/cache")?;
    let sizes: Vec<(String, u64, String)> = mounts
        .iter()
        .filter_map(|m| match &m.source {
            VolumeSource::Memory { size } => Some((size.to_string(), size.bytes(), size.quantity())),
            _ => None,
        })
        .collect();
    assert_eq!(
        sizes,
        [
            ("512M".to_owned(), 512 << 20, "512Mi".to_owned()),
            ("1Gi".to_owned(), 1 << 30, "1Gi".to_owned())
        ]
    );
    assert_eq!(render(&mounts), "512M(memory):/dev/shm,1Gi(memory):/cache");
    Ok(())
}

#[test]
fn cube_studio_default_with_trailing_slash_round_trips_exactly() -> Result<(), VolumeError> {
    let text = "kubeflow-user-workspace(pvc):/mnt/";
    let mounts = parse(text)?;
    assert_eq!(
        mounts,
        [mount(
            VolumeSource::Pvc {
                claim: "kubeflow-user-workspace".into()
            },
            "/mnt/"
        )]
    );
    assert_eq!(mounts[0].normalized_mount_path(), "/mnt");
    assert_eq!(render(&mounts), text);
    Ok(())
}

#[test]
fn nni_host_path_with_trailing_slash_round_trips_exactly() -> Result<(), VolumeError> {
    let text = "/data/k8s/kubeflow/pipeline/workspace/alice/nni/exp-1/log/(hostpath):/tmp/nni-experiments/";
    let mounts = parse(text)?;
    assert_eq!(
        mounts[0].source,
        VolumeSource::HostPath {
            path: "/data/k8s/kubeflow/pipeline/workspace/alice/nni/exp-1/log/".into()
        }
    );
    assert_eq!(render(&mounts), text);
    Ok(())
}

#[test]
fn separators_whitespace_and_empty_entries_are_normalised() -> Result<(), VolumeError> {
    let text = "  kubeflow-user-workspace(pvc):/mnt ;\n kubeflow-archives(pvc):/archives,, ;\t4G(memory):/dev/shm; ";
    let mounts = parse(text)?;
    assert_eq!(mounts.len(), 3);
    assert_eq!(
        render(&mounts),
        "kubeflow-user-workspace(pvc):/mnt,kubeflow-archives(pvc):/archives,4G(memory):/dev/shm"
    );
    assert_eq!(parse(&render(&mounts))?, mounts);
    Ok(())
}

#[test]
fn empty_settings_are_empty_lists() -> Result<(), VolumeError> {
    for text in ["", "   ", ",", ";;", " , ; \n"] {
        assert_eq!(parse(text)?, [], "{text:?}");
    }
    assert_eq!(render(&[]), "");
    Ok(())
}

#[test]
fn a_single_entry_ignores_surrounding_whitespace_but_refuses_lists() {
    assert!(matches!(" a(pvc):/mnt \n".parse::<VolumeMount>(), Ok(m) if m.mount_path == "/mnt"));
    match "a(pvc):/a,b(pvc):/b".parse::<VolumeMount>() {
        Err(error) => {
            assert_eq!(error.entry_index(), 0);
            assert_eq!(error.reason(), &VolumeErrorReason::Separator { separator: ',' });
            assert!(error.to_string().contains(ACCEPTED_FORMS));
        }
        Ok(m) => panic!("accepted {m:?}"),
    }
    assert!(matches!("  ".parse::<VolumeMount>(), Err(e) if e.reason() == &VolumeErrorReason::Empty));
}

#[test]
fn unknown_kinds_are_refused_with_a_hint() {
    let error = refused("a(pvc):/a,b(nfs):/b");
    assert_eq!(error.entry_index(), 1);
    assert_eq!(error.entry(), "b(nfs):/b");
    assert_eq!(
        error.reason(),
        &VolumeErrorReason::UnknownKind {
            kind: "nfs".into(),
            suggestion: None
        }
    );
    let error = refused("b(PVC):/b");
    assert_eq!(
        error.reason(),
        &VolumeErrorReason::UnknownKind {
            kind: "PVC".into(),
            suggestion: Some("pvc")
        }
    );
    assert!(error.to_string().contains("did you mean \"pvc\"?"));
    let error = refused("b(pvc_share):/b");
    assert!(matches!(
        error.reason(),
        VolumeErrorReason::UnknownKind {
            suggestion: Some("pvc-share"),
            ..
        }
    ));
    assert!(matches!(refused("b():/b").reason(), VolumeErrorReason::UnknownKind { kind, .. } if kind.is_empty()));
}

#[test]
fn missing_parentheses_are_refused() {
    assert_eq!(
        refused("kubeflow-user-workspace:/mnt").reason(),
        &VolumeErrorReason::MissingKind
    );
    assert_eq!(refused("a)pvc):/mnt").reason(), &VolumeErrorReason::MissingKind);
    assert_eq!(refused(":/mnt").reason(), &VolumeErrorReason::MissingKind);
    assert_eq!(refused("a(pvc:/mnt").reason(), &VolumeErrorReason::UnclosedKind);
    assert_eq!(
        refused("a(pvc)x:/mnt").reason(),
        &VolumeErrorReason::TextAfterKind { text: "x".into() }
    );
    assert_eq!(
        refused("(pvc):/mnt").reason(),
        &VolumeErrorReason::EmptySource { kind: "pvc" }
    );
}

#[test]
fn missing_or_extra_colons_are_refused() {
    assert_eq!(refused("a(pvc)/mnt").reason(), &VolumeErrorReason::MissingColon);
    assert_eq!(refused("x(pvc):/a;a(pvc)").entry_index(), 1);
    assert_eq!(
        refused("a(pvc):/mnt:ro").reason(),
        &VolumeErrorReason::ExtraColon { count: 2 }
    );
    assert_eq!(
        refused("C:/data(hostpath):/data").reason(),
        &VolumeErrorReason::ExtraColon { count: 2 }
    );
}

#[test]
fn relative_paths_are_refused() {
    assert_eq!(
        refused("a(pvc):mnt").reason(),
        &VolumeErrorReason::InvalidMountPath {
            path: "mnt".into(),
            problem: PathProblem::NotAbsolute
        }
    );
    assert_eq!(
        refused("data(hostpath):/data").reason(),
        &VolumeErrorReason::InvalidHostPath {
            path: "data".into(),
            problem: PathProblem::NotAbsolute
        }
    );
    assert_eq!(
        refused("a(pvc):").reason(),
        &VolumeErrorReason::InvalidMountPath {
            path: String::new(),
            problem: PathProblem::Empty
        }
    );
}

#[test]
fn root_double_slash_and_dot_segments_are_refused() {
    let problem = |text: &str| match refused(text).reason().clone() {
        VolumeErrorReason::InvalidMountPath { problem, .. } | VolumeErrorReason::InvalidHostPath { problem, .. } => {
            problem
        }
        other => panic!("unexpected reason {other:?} for {text:?}"),
    };
    assert_eq!(problem("a(pvc):/"), PathProblem::Root);
    assert_eq!(problem("a(pvc)://mnt"), PathProblem::EmptySegment);
    assert_eq!(problem("a(pvc):/mnt//"), PathProblem::EmptySegment);
    assert_eq!(problem("/a//b(hostpath):/b"), PathProblem::EmptySegment);
    assert_eq!(problem("a(pvc):/mnt/../etc"), PathProblem::DotSegment { segment: ".." });
    assert_eq!(
        problem("/data/..(hostpath):/b"),
        PathProblem::DotSegment { segment: ".." }
    );
    assert_eq!(problem("a(pvc):/mnt/./x"), PathProblem::DotSegment { segment: "." });
    assert_eq!(
        problem("/a(b)(hostpath):/b"),
        PathProblem::Parenthesis { character: '(' }
    );
}

#[test]
fn host_root_is_a_valid_host_path() -> Result<(), VolumeError> {
    let mounts = parse("/(hostpath):/host")?;
    assert_eq!(mounts[0].source, VolumeSource::HostPath { path: "/".into() });
    assert_eq!(render(&mounts), "/(hostpath):/host");
    Ok(())
}

#[test]
fn whitespace_and_control_characters_inside_entries_are_refused() {
    assert_eq!(
        refused("a(pvc): /mnt").reason(),
        &VolumeErrorReason::Whitespace { at: 7 }
    );
    assert_eq!(
        refused("a (pvc):/mnt").reason(),
        &VolumeErrorReason::Whitespace { at: 1 }
    );
    assert_eq!(
        refused("a(pvc):/mnt\0x").reason(),
        &VolumeErrorReason::ControlCharacter {
            character: '\0',
            at: 11
        }
    );
    let message = refused("a(pvc):/m\u{7}").to_string();
    assert!(
        message.contains("\\u{7}"),
        "control characters are escaped in messages: {message}"
    );
}

#[test]
fn names_with_underscores_or_uppercase_are_refused() {
    let error = refused("kubeflow_user_workspace(pvc):/mnt");
    assert_eq!(
        error.reason(),
        &VolumeErrorReason::InvalidName {
            kind: "pvc",
            name: "kubeflow_user_workspace".into(),
            problem: NameProblem::Underscore {
                suggestion: Some("kubeflow-user-workspace".into())
            }
        }
    );
    let message = error.to_string();
    assert!(message.contains("Kubernetes rejects"), "{message}");
    assert!(
        message.contains("did you mean \"kubeflow-user-workspace\")"),
        "{message}"
    );
    assert!(message.contains("DNS-1123"), "{message}");

    let error = refused("MyConfig(configmap):/etc/x");
    assert_eq!(
        error.reason(),
        &VolumeErrorReason::InvalidName {
            kind: "configmap",
            name: "MyConfig".into(),
            problem: NameProblem::Uppercase {
                suggestion: Some("myconfig".into())
            }
        }
    );
    assert!(error.to_string().contains("ConfigMap name"));
    assert!(matches!(
        refused("-token(secret):/s").reason(),
        VolumeErrorReason::InvalidName {
            kind: "secret",
            problem: NameProblem::BadEdge,
            ..
        }
    ));
    assert!(matches!(
        refused("a@b(storage):/s").reason(),
        VolumeErrorReason::InvalidName {
            kind: "storage",
            problem: NameProblem::InvalidCharacter { character: '@' },
            ..
        }
    ));
}

#[test]
fn zero_and_fractional_memory_sizes_are_refused() {
    let problem = |text: &str| match refused(text).reason().clone() {
        VolumeErrorReason::InvalidMemorySize { problem, .. } => problem,
        other => panic!("unexpected reason {other:?} for {text:?}"),
    };
    assert_eq!(problem("0G(memory):/dev/shm"), MemorySizeProblem::Zero);
    assert_eq!(problem("0.5G(memory):/dev/shm"), MemorySizeProblem::Fraction);
    assert_eq!(problem("1.5Gi(memory):/dev/shm"), MemorySizeProblem::Fraction);
    assert_eq!(problem("4096(memory):/dev/shm"), MemorySizeProblem::MissingUnit);
    assert_eq!(
        problem("4gb(memory):/dev/shm"),
        MemorySizeProblem::UnknownUnit { unit: "gb".into() }
    );
    let message = refused("0G(memory):/dev/shm").to_string();
    assert!(message.contains("K, M, G, T, Ki, Mi, Gi or Ti"), "{message}");
}

#[test]
fn duplicate_mount_paths_name_both_entries() {
    let error = refused("a(pvc):/mnt, b(pvc-share):/data ; c(pvc-share):/mnt/");
    assert_eq!(error.entry_index(), 2);
    assert_eq!(error.entry(), "c(pvc-share):/mnt/");
    assert_eq!(
        error.reason(),
        &VolumeErrorReason::DuplicateMountPath {
            mount_path: "/mnt/".into(),
            first_index: 0,
            first_entry: "a(pvc):/mnt".into(),
        }
    );
    let message = error.to_string();
    assert!(message.contains("\"a(pvc):/mnt\""), "{message}");
    assert!(message.contains("\"c(pvc-share):/mnt/\""), "{message}");
    assert!(message.contains("entry 0"), "{message}");
    assert!(message.contains("entry 2"), "{message}");
}

#[test]
fn indexes_count_empty_entries() {
    let error = refused("a(pvc):/a,,;b_c(pvc):/b");
    assert_eq!(error.entry_index(), 3);
    assert_eq!(error.entry(), "b_c(pvc):/b");
}

#[test]
fn very_long_input_is_refused_with_a_short_message() {
    let long_path = format!("a(pvc):/{}", "x".repeat(5000));
    let error = refused(&long_path);
    assert_eq!(
        error.reason(),
        &VolumeErrorReason::InvalidMountPath {
            path: long_path["a(pvc):".len()..].to_owned(),
            problem: PathProblem::TooLong { len: 5001 }
        }
    );
    assert_eq!(error.entry(), long_path);
    let message = error.to_string();
    assert!(message.len() < 2000, "message is {} bytes", message.len());
    assert!(message.contains("(5008 bytes)"), "{message}");

    let long_name = format!("{}(secret):/s", "n".repeat(300));
    assert!(matches!(
        refused(&long_name).reason(),
        VolumeErrorReason::InvalidName {
            problem: NameProblem::TooLong { len: 300 },
            ..
        }
    ));
    assert!(matches!(
        refused("99999999999999999999999999G(memory):/dev/shm").reason(),
        VolumeErrorReason::InvalidMemorySize {
            problem: MemorySizeProblem::TooLarge,
            ..
        }
    ));

    let garbage = "é".repeat(200_000);
    let error = refused(&garbage);
    assert_eq!(error.reason(), &VolumeErrorReason::MissingColon);
    assert!(error.to_string().len() < 2000);

    let many: Vec<String> = (0..5000).map(|i| format!("c{i}(pvc):/m/{i}")).collect();
    let text = format!("{},x{}(pvc):/m/17", many.join(","), 5000);
    let error = refused(&text);
    assert_eq!(error.entry_index(), 5000);
    assert!(matches!(
        error.reason(),
        VolumeErrorReason::DuplicateMountPath { first_index: 17, .. }
    ));
}

#[test]
fn mounts_built_by_hand_are_checked() {
    let good = VolumeMount::new(VolumeSource::Secret { name: "s".into() }, "/s");
    assert!(matches!(good, Ok(ref m) if m.mount_path == "/s"));
    assert_eq!(
        VolumeMount::new(VolumeSource::Secret { name: "s".into() }, "/a,b"),
        Err(VolumeErrorReason::InvalidMountPath {
            path: "/a,b".into(),
            problem: PathProblem::Separator { separator: ',' }
        })
    );
    assert_eq!(
        VolumeMount::new(VolumeSource::HostPath { path: "/a b".into() }, "/b"),
        Err(VolumeErrorReason::InvalidHostPath {
            path: "/a b".into(),
            problem: PathProblem::Whitespace
        })
    );
    let list = [
        mount(VolumeSource::Pvc { claim: "a".into() }, "/mnt"),
        mount(VolumeSource::Pvc { claim: "B".into() }, "/b"),
    ];
    match validate(&list) {
        Err(error) => {
            assert_eq!(error.entry_index(), 1);
            assert_eq!(error.entry(), "B(pvc):/b");
            assert!(error.to_string().contains(ACCEPTED_FORMS));
        }
        Ok(()) => panic!("an uppercase claim was accepted"),
    }
    let clash = [
        mount(VolumeSource::Pvc { claim: "a".into() }, "/mnt/"),
        mount(VolumeSource::Pvc { claim: "b".into() }, "/mnt"),
    ];
    assert!(matches!(
        validate(&clash),
        Err(e) if e.entry_index() == 1 && matches!(e.reason(), VolumeErrorReason::DuplicateMountPath { first_index: 0, .. })
    ));
    assert_eq!(validate(&list[..1]), Ok(()));
}
