//! A project's settings and quotas: checked field by field, stored as JSON, converted to and from the API.

use std::collections::BTreeMap;

use cube_kit::FieldViolation;
use cube_kit::names::dns_label;
use cube_proto::cube::projects::v1::{Quota, Settings};
use serde::{Deserialize, Serialize};

/// Settings as stored: every field checked, volume mounts in their canonical text.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub(crate) struct StoredSettings {
    pub(crate) cluster: String,
    pub(crate) resource_group: String,
    pub(crate) node_selector: BTreeMap<String, String>,
    pub(crate) volume_mounts: String,
    pub(crate) service_external_ip: String,
    pub(crate) pipeline_namespace: String,
    pub(crate) notebook_namespace: String,
    pub(crate) service_namespace: String,
    pub(crate) display_order: i32,
}

/// A quota as stored.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub(crate) struct StoredQuota {
    pub(crate) cpu: Option<f64>,
    pub(crate) memory_bytes: Option<i64>,
    pub(crate) gpu: Option<f64>,
    pub(crate) gpu_by_type: BTreeMap<String, f64>,
    pub(crate) notebooks: Option<i32>,
    pub(crate) services: Option<i32>,
    pub(crate) runs: Option<i32>,
}
/// Whether `value` is a Kubernetes label value (empty allowed).
fn label_value(value: &str) -> bool {
    let bytes = value.as_bytes();
    bytes.is_empty()
        || (bytes.len() <= 63
            && bytes[0].is_ascii_alphanumeric()
            && bytes[bytes.len() - 1].is_ascii_alphanumeric()
            && bytes
                .iter()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.')))
}

/// Whether `key` is a Kubernetes label key: `[prefix/]name`.
fn label_key(key: &str) -> bool {
    let (prefix, name) = match key.rsplit_once('/') {
        Some((prefix, name)) => (Some(prefix), name),
        None => (None, key),
    };
    let prefix_ok =
        prefix.is_none_or(|prefix| !prefix.is_empty() && prefix.len() <= 253 && prefix.split('.').all(dns_label));
    prefix_ok && !name.is_empty() && label_value(name)
}

/// Checks settings from a request; `prefix` is the field path of the settings message.
pub(crate) fn check_settings(prefix: &str, settings: Settings) -> Result<StoredSettings, Vec<FieldViolation>> {
    let mut violations = Vec::new();
    let mut bad = |field: &str, description: String| {
        violations.push(FieldViolation::new(format!("{prefix}.{field}"), description));
    };
    if !settings.cluster.is_empty() && !dns_label(&settings.cluster) {
        bad(
            "cluster",
            format!("{:?} is not a cluster name (a DNS label)", settings.cluster),
        );
    }
    if !settings.resource_group.is_empty() && (!label_value(&settings.resource_group)) {
        bad(
            "resource_group",
            format!(
                "{:?} is not a node label value: at most 63 letters, digits, '-', '_' or '.', alphanumeric at both ends",
                settings.resource_group
            ),
        );
    }
    for (key, value) in &settings.node_selector {
        if !label_key(key) {
            bad(
                &format!("node_selector[{key:?}]"),
                "the key is not a node label key: [prefix/]name, name at most 63 letters, digits, '-', '_' or '.'"
                    .into(),
            );
        } else if !label_value(value) {
            bad(
                &format!("node_selector[{key:?}]"),
                format!("{value:?} is not a node label value: at most 63 letters, digits, '-', '_' or '.'"),
            );
        } else if key == "org" {
            bad(
                &format!("node_selector[{key:?}]"),
                "set the resource group in resource_group, not as an org label".into(),
            );
        }
    }
    let volume_mounts = match cube_volumes::parse(&settings.volume_mounts) {
        Ok(mounts) => cube_volumes::render(&mounts),
        Err(error) => {
            bad("volume_mounts", error.to_string());
            String::new()
        }
    };
    if !settings.service_external_ip.is_empty() {
        let mut parts = settings.service_external_ip.split('|');
        let inner = parts.next().unwrap_or_default();
        let outer = parts.next();
        let outer_ok = outer.is_none_or(|outer| {
            outer.parse::<std::net::IpAddr>().is_ok() || (!outer.is_empty() && outer.split('.').all(dns_label))
        });
        if inner.parse::<std::net::IpAddr>().is_err() || !outer_ok || parts.next().is_some() {
            bad(
                "service_external_ip",
                format!(
                    "{:?} is not `inner` or `inner|outer`: inner an IP address, outer an IP address or host name, e.g. 10.0.0.5|ml.example.com",
                    settings.service_external_ip
                ),
            );
        }
    }
    for (field, namespace) in [
        ("pipeline_namespace", &settings.pipeline_namespace),
        ("notebook_namespace", &settings.notebook_namespace),
        ("service_namespace", &settings.service_namespace),
    ] {
        if !namespace.is_empty() && !dns_label(namespace) {
            bad(field, format!("{namespace:?} is not a namespace name (a DNS label)"));
        }
    }
    if !violations.is_empty() {
        return Err(violations);
    }
    Ok(StoredSettings {
        cluster: settings.cluster,
        resource_group: settings.resource_group,
        node_selector: settings.node_selector.into_iter().collect(),
        volume_mounts,
        service_external_ip: settings.service_external_ip,
        pipeline_namespace: settings.pipeline_namespace,
        notebook_namespace: settings.notebook_namespace,
        service_namespace: settings.service_namespace,
        display_order: settings.display_order,
    })
}

impl StoredSettings {
    /// The settings as the API shows them, defaults filled in.
    pub(crate) fn message(&self) -> Settings {
        let or = |value: &str, default: &str| {
            if value.is_empty() {
                default.to_owned()
            } else {
                value.to_owned()
            }
        };
        Settings {
            cluster: self.cluster.clone(),
            resource_group: or(&self.resource_group, "public"),
            node_selector: self.node_selector.clone().into_iter().collect(),
            volume_mounts: self.volume_mounts.clone(),
            service_external_ip: self.service_external_ip.clone(),
            pipeline_namespace: or(&self.pipeline_namespace, "pipeline"),
            notebook_namespace: or(&self.notebook_namespace, "jupyter"),
            service_namespace: or(&self.service_namespace, "service"),
            display_order: self.display_order,
        }
    }
}

/// Checks a quota from a request; `prefix` is the field path of the quota message.
pub(crate) fn check_quota(prefix: &str, quota: Quota) -> Result<StoredQuota, Vec<FieldViolation>> {
    let mut violations = Vec::new();
    let mut amounts: Vec<(String, f64)> = Vec::new();
    amounts.extend(quota.cpu.map(|value| ("cpu".to_owned(), value)));
    amounts.extend(quota.gpu.map(|value| ("gpu".to_owned(), value)));
    for (gpu_type, value) in &quota.gpu_by_type {
        if gpu_type.is_empty() || !label_value(gpu_type) {
            violations.push(FieldViolation::new(
                format!("{prefix}.gpu_by_type[{gpu_type:?}]"),
                "the GPU type must be a node label value, e.g. T4 or V100",
            ));
        }
        amounts.push((format!("gpu_by_type[{gpu_type:?}]"), *value));
    }
    for (field, value) in amounts {
        if !value.is_finite() || value < 0.0 {
            violations.push(FieldViolation::new(
                format!("{prefix}.{field}"),
                "must be a finite number, zero or more",
            ));
        }
    }
    let counts = [
        ("memory_bytes", quota.memory_bytes),
        ("notebooks", quota.notebooks.map(i64::from)),
        ("services", quota.services.map(i64::from)),
        ("runs", quota.runs.map(i64::from)),
    ];
    for (field, value) in counts {
        if value.is_some_and(|value| value < 0) {
            violations.push(FieldViolation::new(format!("{prefix}.{field}"), "must be zero or more"));
        }
    }
    if !violations.is_empty() {
        return Err(violations);
    }
    Ok(StoredQuota {
        cpu: quota.cpu,
        memory_bytes: quota.memory_bytes,
        gpu: quota.gpu,
        gpu_by_type: quota.gpu_by_type.into_iter().collect(),
        notebooks: quota.notebooks,
        services: quota.services,
        runs: quota.runs,
    })
}

impl StoredQuota {
    /// The quota as the API shows it.
    pub(crate) fn message(&self) -> Quota {
        Quota {
            cpu: self.cpu,
            memory_bytes: self.memory_bytes,
            gpu: self.gpu,
            gpu_by_type: self.gpu_by_type.clone().into_iter().collect(),
            notebooks: self.notebooks,
            services: self.services,
            runs: self.runs,
        }
    }
}
