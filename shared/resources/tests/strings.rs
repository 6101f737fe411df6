//! Every accepted form and every refusal of the CPU, memory and GPU grammars.

use cube_resources::{CpuSpec, GpuSpec, MemorySpec, ParseError, Problem, ResourceKind};

const GIB: u64 = 1 << 30;
const MIB: u64 = 1 << 20;

fn cpu_problem(text: &str) -> Problem {
    match text.parse::<CpuSpec>() {
        Ok(spec) => panic!("cpu {text:?} was accepted as {spec:?}"),
        Err(error) => {
            assert_eq!(error.kind, ResourceKind::Cpu);
            assert_eq!(error.text, text);
            error.problem
        }
    }
}

fn memory_problem(text: &str) -> Problem {
    match text.parse::<MemorySpec>() {
        Ok(spec) => panic!("memory {text:?} was accepted as {spec:?}"),
        Err(error) => {
            assert_eq!(error.kind, ResourceKind::Memory);
            assert_eq!(error.text, text);
            error.problem
        }
    }
}

fn gpu_problem(text: &str) -> Problem {
    match text.parse::<GpuSpec>() {
        Ok(spec) => panic!("gpu {text:?} was accepted as {spec:?}"),
        Err(error) => {
            assert_eq!(error.kind, ResourceKind::Gpu);
            assert_eq!(error.text, text);
            error.problem
        }
    }
}

#[test]
fn cpu_forms() -> Result<(), ParseError> {
    for (text, request, limit, canonical) in [
        ("2", 2000, 2000, "2"),
        ("0.5", 500, 500, "0.5"),
        (".5", 500, 500, "0.5"),
        ("0.001", 1, 1, "0.001"),
        ("1.250", 1250, 1250, "1.25"),
        ("0.5000", 500, 500, "0.5"),
        ("2.0", 2000, 2000, "2"),
        ("007", 7000, 7000, "7"),
        (" 4 ", 4000, 4000, "4"),
        ("1~4", 1000, 4000, "1~4"),
        ("0~4", 0, 4000, "0~4"),
        ("0.5~0.5", 500, 500, "0.5"),
        ("1 ~ 4", 1000, 4000, "1~4"),
        ("1-4", 1000, 4000, "1~4"),
        ("1_4", 1000, 4000, "1~4"),
        ("1～4", 1000, 4000, "1~4"),
        ("0.25~1.5", 250, 1500, "0.25~1.5"),
        ("50.0", 50000, 50000, "50"),
    ] {
        let spec: CpuSpec = text.parse()?;
        assert_eq!(
            (spec.request_millis(), spec.limit_millis()),
            (request, limit),
            "{text:?}"
        );
        assert_eq!(spec.to_string(), canonical, "{text:?}");
        assert_eq!(canonical.parse::<CpuSpec>()?, spec, "{canonical:?}");
    }
    Ok(())
}

#[test]
fn cpu_refusals() {
    for (text, problem) in [
        ("", Problem::Empty),
        ("   ", Problem::Empty),
        ("0", Problem::Zero),
        ("0.0", Problem::Zero),
        ("0~0", Problem::Zero),
        ("-1", Problem::Negative),
        ("-1~4", Problem::Negative),
        ("1~-4", Problem::Negative),
        ("4~1", Problem::RequestAboveLimit),
        ("0.0001", Problem::TooManyDecimals),
        ("1.2345", Problem::TooManyDecimals),
        ("500m", Problem::Millicores),
        ("0.5~2000m", Problem::Millicores),
        ("NaN", Problem::Malformed),
        ("nan", Problem::Malformed),
        ("inf", Problem::Malformed),
        ("1e3", Problem::Malformed),
        ("+1", Problem::Malformed),
        ("1.", Problem::Malformed),
        ("1,5", Problem::Malformed),
        ("two", Problem::Malformed),
        ("1~", Problem::Malformed),
        ("~4", Problem::Malformed),
        ("1~2~3", Problem::Malformed),
        ("1G", Problem::Malformed),
        ("1M", Problem::Malformed),
        ("２", Problem::Malformed),
        ("99999999999999999999", Problem::TooLarge),
    ] {
        assert_eq!(cpu_problem(text), problem, "{text:?}");
    }
}

#[test]
fn memory_forms() -> Result<(), ParseError> {
    for (text, request, limit, canonical) in [
        ("4G", 4 * GIB, 4 * GIB, "4G"),
        ("4g", 4 * GIB, 4 * GIB, "4G"),
        ("4Gi", 4 * GIB, 4 * GIB, "4G"),
        ("4gi", 4 * GIB, 4 * GIB, "4G"),
        ("4 G", 4 * GIB, 4 * GIB, "4G"),
        ("512M", 512 * MIB, 512 * MIB, "512M"),
        ("512m", 512 * MIB, 512 * MIB, "512M"),
        ("512Mi", 512 * MIB, 512 * MIB, "512M"),
        ("1024M", GIB, GIB, "1G"),
        ("1536M", 1536 * MIB, 1536 * MIB, "1536M"),
        ("1T", 1 << 40, 1 << 40, "1T"),
        ("2Ti", 2 << 40, 2 << 40, "2T"),
        ("2G~8G", 2 * GIB, 8 * GIB, "2G~8G"),
        ("2G-8G", 2 * GIB, 8 * GIB, "2G~8G"),
        ("2g_8g", 2 * GIB, 8 * GIB, "2G~8G"),
        ("512M~2G", 512 * MIB, 2 * GIB, "512M~2G"),
        ("0G~8G", 0, 8 * GIB, "0~8G"),
        ("0~8G", 0, 8 * GIB, "0~8G"),
        ("8G~8G", 8 * GIB, 8 * GIB, "8G"),
        ("04G", 4 * GIB, 4 * GIB, "4G"),
    ] {
        let spec: MemorySpec = text.parse()?;
        assert_eq!((spec.request_bytes(), spec.limit_bytes()), (request, limit), "{text:?}");
        assert_eq!(spec.to_string(), canonical, "{text:?}");
        assert_eq!(canonical.parse::<MemorySpec>()?, spec, "{canonical:?}");
    }
    Ok(())
}

#[test]
fn memory_refusals() {
    for (text, problem) in [
        ("", Problem::Empty),
        ("0G", Problem::Zero),
        ("0", Problem::Zero),
        ("0G~0G", Problem::Zero),
        ("4", Problem::MissingUnit),
        ("4~8G", Problem::MissingUnit),
        ("1.5G", Problem::FractionalMemory),
        ("0.5G~1G", Problem::FractionalMemory),
        ("4K", Problem::UnknownUnit("K".into())),
        ("4GB", Problem::UnknownUnit("GB".into())),
        ("4P", Problem::UnknownUnit("P".into())),
        ("4 bytes", Problem::UnknownUnit("bytes".into())),
        ("-4G", Problem::Negative),
        ("2G~-8G", Problem::Negative),
        ("8G~2G", Problem::RequestAboveLimit),
        ("2G~1024M~4G", Problem::Malformed),
        ("G", Problem::Malformed),
        ("~8G", Problem::Malformed),
        ("NaN", Problem::Malformed),
        ("1..5G", Problem::Malformed),
        ("99999999999999999999G", Problem::TooLarge),
        ("99999999999T", Problem::TooLarge),
    ] {
        assert_eq!(memory_problem(text), problem, "{text:?}");
    }
}

fn whole(count: u32, vendor: Option<&str>, gpu_type: Option<&str>) -> GpuSpec {
    GpuSpec::Whole {
        count,
        vendor: vendor.map(str::to_owned),
        gpu_type: gpu_type.map(str::to_owned),
    }
}

fn fraction(share_thousandths: u32, vendor: Option<&str>, gpu_type: Option<&str>) -> GpuSpec {
    GpuSpec::Fraction {
        share_thousandths,
        vendor: vendor.map(str::to_owned),
        gpu_type: gpu_type.map(str::to_owned),
    }
}

#[test]
fn gpu_forms() -> Result<(), ParseError> {
    for (text, spec, canonical) in [
        ("", GpuSpec::None, "0"),
        ("  ", GpuSpec::None, "0"),
        ("0", GpuSpec::None, "0"),
        ("0.0", GpuSpec::None, "0"),
        ("1", whole(1, None, None), "1"),
        ("1.0", whole(1, None, None), "1"),
        ("8", whole(8, None, None), "8"),
        ("2(T4)", whole(2, None, Some("T4")), "2(T4)"),
        ("2(t4)", whole(2, None, Some("T4")), "2(T4)"),
        ("2 ( T4 )", whole(2, None, Some("T4")), "2(T4)"),
        ("2（T4）", whole(2, None, Some("T4")), "2(T4)"),
        (
            "1(nvidia,V100)",
            whole(1, Some("nvidia"), Some("V100")),
            "1(nvidia,V100)",
        ),
        (
            "1(NVIDIA, v100)",
            whole(1, Some("nvidia"), Some("V100")),
            "1(nvidia,V100)",
        ),
        (
            "1（nvidia，V100）",
            whole(1, Some("nvidia"), Some("V100")),
            "1(nvidia,V100)",
        ),
        ("1(gpu)", whole(1, None, Some("GPU")), "1(GPU)"),
        ("1(nvidia,)", whole(1, Some("nvidia"), None), "1(nvidia,)"),
        (
            "1(A100-SXM4-80GB)",
            whole(1, None, Some("A100-SXM4-80GB")),
            "1(A100-SXM4-80GB)",
        ),
        ("0.25", fraction(250, None, None), "0.25"),
        (".5", fraction(500, None, None), "0.5"),
        ("0.001", fraction(1, None, None), "0.001"),
        ("0.999", fraction(999, None, None), "0.999"),
        ("0.5(T4)", fraction(500, None, Some("T4")), "0.5(T4)"),
        ("0.5(mgpu,T4)", fraction(500, Some("mgpu"), Some("T4")), "0.5(mgpu,T4)"),
    ] {
        let parsed: GpuSpec = text.parse()?;
        assert_eq!(parsed, spec, "{text:?}");
        assert_eq!(parsed.to_string(), canonical, "{text:?}");
        assert_eq!(canonical.parse::<GpuSpec>()?, spec, "{canonical:?}");
        parsed.validate()?;
    }
    Ok(())
}

#[test]
fn gpu_refusals() {
    for (text, problem) in [
        ("1.5", Problem::NotWholeGpu),
        ("2.5(T4)", Problem::NotWholeGpu),
        ("1.001", Problem::NotWholeGpu),
        ("-1", Problem::Negative),
        ("-0.5", Problem::Negative),
        ("0.0001", Problem::TooManyDecimals),
        ("0(T4)", Problem::QualifierWithoutGpu),
        ("0(nvidia,T4)", Problem::QualifierWithoutGpu),
        ("NaN", Problem::Malformed),
        ("inf", Problem::Malformed),
        ("1e2", Problem::Malformed),
        ("two", Problem::Malformed),
        ("(T4)", Problem::Malformed),
        ("1(T4", Problem::Malformed),
        ("1T4)", Problem::Malformed),
        ("1(T4)x", Problem::Malformed),
        ("1((T4))", Problem::Malformed),
        ("1(a,b,c)", Problem::Malformed),
        ("1~2", Problem::Malformed),
        ("1()", Problem::BadGpuType(String::new())),
        ("1(T 4)", Problem::BadGpuType("T 4".into())),
        ("1(T4/x)", Problem::BadGpuType("T4/x".into())),
        ("1(-T4)", Problem::BadGpuType("-T4".into())),
        ("1(,T4)", Problem::BadVendor(String::new())),
        ("1(nv idia,T4)", Problem::BadVendor("nv idia".into())),
        ("4294967296", Problem::TooLarge),
    ] {
        assert_eq!(gpu_problem(text), problem, "{text:?}");
    }
}

#[test]
fn hand_built_gpu_specs_are_checked() {
    for (spec, problem) in [
        (whole(0, None, None), Problem::Zero),
        (whole(0, None, Some("T4")), Problem::QualifierWithoutGpu),
        (fraction(0, None, None), Problem::Zero),
        (fraction(1000, None, None), Problem::NotWholeGpu),
        (fraction(1500, None, None), Problem::NotWholeGpu),
        (whole(1, None, Some("t4")), Problem::BadGpuType("t4".into())),
        (whole(1, None, Some("T 4")), Problem::BadGpuType("T 4".into())),
        (whole(1, Some("NVIDIA"), None), Problem::BadVendor("NVIDIA".into())),
        (fraction(500, Some(""), None), Problem::BadVendor(String::new())),
    ] {
        match spec.validate() {
            Ok(()) => panic!("{spec:?} was accepted"),
            Err(error) => assert_eq!(error.problem, problem, "{spec:?}"),
        }
    }
}

#[test]
fn hand_built_cpu_and_memory_specs_are_checked() {
    assert_eq!(CpuSpec::new(0, 0).map_err(|error| error.problem), Err(Problem::Zero));
    assert_eq!(
        CpuSpec::new(2000, 1000).map_err(|error| error.problem),
        Err(Problem::RequestAboveLimit)
    );
    assert!(CpuSpec::new(0, 1).is_ok());
    assert_eq!(CpuSpec::exact(0).map_err(|error| error.problem), Err(Problem::Zero));
    assert_eq!(MemorySpec::new(0, 0).map_err(|error| error.problem), Err(Problem::Zero));
    assert_eq!(
        MemorySpec::new(2 * GIB, GIB).map_err(|error| error.problem),
        Err(Problem::RequestAboveLimit)
    );
    assert_eq!(
        MemorySpec::exact(1000).map_err(|error| error.problem),
        Err(Problem::FractionalMemory)
    );
    assert!(MemorySpec::new(0, MIB).is_ok());
}

#[test]
fn messages_name_the_text_and_the_accepted_forms() {
    let error = "1.5".parse::<GpuSpec>().err().map(|error| error.to_string());
    assert_eq!(
        error.as_deref(),
        Some(
            "gpu \"1.5\" is not valid: whole GPUs must be an integer (a vGPU share is a number below 1); expected whole GPUs as \"1\", \"2(T4)\" (type) or \"1(nvidia,V100)\" (vendor,type), a vGPU share below 1 as \"0.25\", or \"0\" for none"
        )
    );
    let error = "1.5G".parse::<MemorySpec>().err().map(|error| error.to_string());
    assert_eq!(
        error.as_deref(),
        Some(
            "memory \"1.5G\" is not valid: memory takes whole numbers: write 1536M for 1.5G; expected a whole number with unit M, G or T (binary; Mi, Gi, Ti also accepted) as \"4G\" or \"512M\", or request~limit as \"2G~8G\" or \"0~8G\""
        )
    );
    let error = "500m".parse::<CpuSpec>().err().map(|error| error.to_string());
    assert_eq!(
        error.as_deref(),
        Some(
            "cpu \"500m\" is not valid: cores take no unit: write 0.5 for 500m; expected cores as \"2\" or \"0.5\" (above 0, at most 3 decimals), or request~limit as \"1~4\" or \"0~4\""
        )
    );
}

#[test]
fn gpu_accessors() -> Result<(), ParseError> {
    let spec: GpuSpec = "2(nvidia,T4)".parse()?;
    assert_eq!(spec.vendor(), Some("nvidia"));
    assert_eq!(spec.gpu_type(), Some("T4"));
    assert_eq!(spec.thousandths(), 2000);
    assert_eq!("0.25".parse::<GpuSpec>()?.thousandths(), 250);
    assert_eq!(GpuSpec::None.thousandths(), 0);
    assert_eq!(GpuSpec::default(), GpuSpec::None);
    Ok(())
}
