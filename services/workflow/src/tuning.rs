//! What a task's real usage says it should ask for, decided without I/O: cube-studio's rule (`ceil(max × 1.4) + 2`
//! cores and GiB over the last 10 successful runs) with its bugs fixed: fractions and ranges are read (a range stays
//! a range), memory is compared in bytes, and the project's quota and the platform's maximum bound the result.

use cube_proto::cube::workflow::v1::TaskRecommendation;
use cube_resources::{CpuSpec, MemorySpec};

/// How many successful runs' usage a recommendation needs, and is judged from.
pub(crate) const SAMPLES: usize = 10;
/// The most CPU a recommendation asks for, millicores (cube-studio's cap).
pub(crate) const PLATFORM_MAX_CPU_MILLIS: u64 = 150_000;
/// The most memory a recommendation asks for, bytes (cube-studio's cap).
pub(crate) const PLATFORM_MAX_MEMORY_BYTES: u64 = 350 << 30;
/// The template environment variable that keeps a template's tasks out of tuning.
pub(crate) const NO_RESOURCE_CHECK: &str = "NO_RESOURCE_CHECK";

const GIB: f64 = (1_u64 << 30) as f64;

/// The highest usage of one successful run of a task.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Sample {
    /// CPU, cores.
    pub(crate) cpu_cores: f64,
    /// Memory, bytes.
    pub(crate) memory_bytes: u64,
}

/// What a recommendation may not exceed besides the platform's maximum: the project's quota.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Bounds {
    /// The project's CPU quota, millicores.
    pub(crate) cpu_millis: Option<u64>,
    /// The project's memory quota, bytes.
    pub(crate) memory_bytes: Option<u64>,
}

/// A recommendation, in the task's own forms.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Recommendation {
    /// CPU to ask for.
    pub(crate) cpu: String,
    /// Memory to ask for.
    pub(crate) memory: String,
    /// The highest CPU used, cores.
    pub(crate) max_cpu: f64,
    /// The highest memory used, bytes.
    pub(crate) max_memory_bytes: u64,
}

/// The recommendation for a task asking `cpu` and `memory` from the usage `samples` of its newest successful runs
/// (the newest [`SAMPLES`] count), or why there is none.
pub(crate) fn recommend(cpu: &str, memory: &str, samples: &[Sample], bounds: Bounds) -> Result<Recommendation, String> {
    if samples.len() < SAMPLES {
        return Err(format!(
            "{} of the {SAMPLES} successful runs needed have usage samples",
            samples.len()
        ));
    }
    let newest = &samples[..SAMPLES];
    let max_cpu = newest.iter().map(|sample| sample.cpu_cores).fold(0.0, f64::max);
    let max_memory_bytes = newest.iter().map(|sample| sample.memory_bytes).max().unwrap_or(0);
    let grown = |used: f64| (used * 1.4).ceil() + 2.0;
    let cpu_limit = [Some(PLATFORM_MAX_CPU_MILLIS), bounds.cpu_millis]
        .into_iter()
        .flatten()
        .min()
        .unwrap_or(PLATFORM_MAX_CPU_MILLIS);
    let memory_limit = [Some(PLATFORM_MAX_MEMORY_BYTES), bounds.memory_bytes]
        .into_iter()
        .flatten()
        .min()
        .unwrap_or(PLATFORM_MAX_MEMORY_BYTES);
    #[expect(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        reason = "whole, positive and far below u64::MAX once bounded"
    )]
    let cpu_millis = (grown(max_cpu) * 1000.0).min(cpu_limit as f64) as u64;
    #[expect(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        clippy::cast_precision_loss,
        reason = "whole, positive and far below u64::MAX once bounded"
    )]
    let memory_bytes = (grown(max_memory_bytes as f64 / GIB) * GIB).min(memory_limit as f64) as u64;
    // Memory is asked for in whole MiB.
    let memory_bytes = memory_bytes >> 20 << 20;
    // A range stays a range: the request is kept unless it is above the new limit.
    let current_cpu: Option<CpuSpec> = cpu.parse().ok();
    let new_cpu = match current_cpu {
        Some(spec) if spec.request_millis() != spec.limit_millis() => {
            CpuSpec::new(spec.request_millis().min(cpu_millis), cpu_millis)
        }
        _ => CpuSpec::exact(cpu_millis),
    }
    .map_err(|error| error.to_string())?;
    let current_memory: Option<MemorySpec> = memory.parse().ok();
    let new_memory = match current_memory {
        Some(spec) if spec.request_bytes() != spec.limit_bytes() => {
            MemorySpec::new(spec.request_bytes().min(memory_bytes), memory_bytes)
        }
        _ => MemorySpec::exact(memory_bytes),
    }
    .map_err(|error| error.to_string())?;
    Ok(Recommendation {
        cpu: new_cpu.to_string(),
        memory: new_memory.to_string(),
        max_cpu,
        max_memory_bytes,
    })
}

/// Whether recommendation `now` is news for the pipeline's owner: it changes the task's resources, and it is not
/// what `before` (the recommendation before the newest sample, given when it is not applied) already said.
pub(crate) fn news(now: &TaskRecommendation, before: Option<&TaskRecommendation>) -> bool {
    let changes = !now.cpu.is_empty() && (now.cpu != now.current_cpu || now.memory != now.current_memory);
    changes && before.is_none_or(|before| (&before.cpu, &before.memory) != (&now.cpu, &now.memory))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_recommendation_is_news_when_it_changes_the_task_and_not_again_unapplied() {
        let advice = |cpu: &str, memory: &str| TaskRecommendation {
            cpu: cpu.into(),
            memory: memory.into(),
            current_cpu: "1".into(),
            current_memory: "2G".into(),
            ..TaskRecommendation::default()
        };
        let now = advice("5", "5G");
        assert!(news(&now, None), "applied: news whenever it changes the task");
        assert!(news(&now, Some(&advice("", ""))), "the first recommendation");
        assert!(news(&now, Some(&advice("4", "5G"))), "the newest sample changed it");
        assert!(
            !news(&now, Some(&advice("5", "5G"))),
            "said already at the sample before"
        );
        assert!(!news(&advice("1", "2G"), None), "what the task has");
        assert!(!news(&advice("", ""), None), "none");
    }

    fn samples(count: usize, cpu_cores: f64, memory_bytes: u64) -> Vec<Sample> {
        (0..count)
            .map(|_| Sample {
                cpu_cores,
                memory_bytes,
            })
            .collect()
    }

    #[test]
    fn ten_runs_recommend_the_grown_maximum_and_nine_do_not() {
        let mut ten = samples(10, 1.0, 1 << 30);
        ten[3] = Sample {
            cpu_cores: 1.9,
            memory_bytes: (1 << 30) + (900 << 20),
        };
        let got = recommend("0.5", "2G", &ten, Bounds::default()).unwrap_or_else(|reason| panic!("{reason}"));
        assert_eq!((got.cpu.as_str(), got.memory.as_str()), ("5", "5G"));
        assert!((got.max_cpu - 1.9).abs() < 1e-9);
        let nine = recommend("0.5", "2G", &ten[..9], Bounds::default()).expect_err("nine are too few");
        assert!(nine.starts_with("9 of the 10"), "{nine}");
    }

    #[test]
    fn ranges_stay_ranges_and_fractions_and_units_are_read() {
        let ten = samples(10, 0.25, 300 << 20);
        let got = recommend("1~4", "512M~8G", &ten, Bounds::default()).unwrap_or_else(|reason| panic!("{reason}"));
        // ceil(0.35) + 2 = 3 cores; ceil(0.41 GiB) + 2 = 3 GiB.
        assert_eq!((got.cpu.as_str(), got.memory.as_str()), ("1~3", "512M~3G"));
        let got = recommend("4~8", "4G", &ten, Bounds::default()).unwrap_or_else(|reason| panic!("{reason}"));
        assert_eq!(got.cpu, "3", "a request above the new limit comes down to it");
    }

    #[test]
    fn the_project_quota_and_the_platform_maximum_bound_it() {
        let heavy = samples(10, 200.0, 400 << 30);
        let got = recommend("1", "1G", &heavy, Bounds::default()).unwrap_or_else(|reason| panic!("{reason}"));
        assert_eq!((got.cpu.as_str(), got.memory.as_str()), ("150", "350G"));
        let bounds = Bounds {
            cpu_millis: Some(2500),
            memory_bytes: Some(3 << 30),
        };
        let got = recommend("1", "1G", &heavy, bounds).unwrap_or_else(|reason| panic!("{reason}"));
        assert_eq!((got.cpu.as_str(), got.memory.as_str()), ("2.5", "3G"));
    }
}
