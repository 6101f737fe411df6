//! Istio VirtualServices (`networking.istio.io/v1beta1`), routing a host to Services with weights for canaries.
//! Their CRD ships in `k8s/crds/`, so a cluster without Istio accepts them too.

use kube::api::{ApiResource, DynamicObject, GroupVersionKind};
use serde_json::json;

use super::metadata::Metadata;
use crate::error::RuntimeError;

/// The API group.
pub const GROUP: &str = "networking.istio.io";

/// The version Cube writes.
pub const VERSION: &str = "v1beta1";

/// The kind.
pub const KIND: &str = "VirtualService";

/// Where a share of the requests goes: a Service's host and port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Destination {
    /// The Service's host: its name in the VirtualService's namespace, or a full name.
    pub host: String,
    /// The Service port.
    pub port: u16,
    /// The percentage of requests it gets; the weights of a route add up to 100.
    pub weight: u32,
}

/// What a VirtualService routes: requests for `hosts` coming through `gateways`, spread over `destinations`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VirtualService {
    /// The hosts it answers for, e.g. `model.example.com`.
    pub hosts: Vec<String>,
    /// The gateways (`namespace/name`) it applies to; none means the mesh's sidecars.
    pub gateways: Vec<String>,
    /// Where the requests go.
    pub destinations: Vec<Destination>,
}

/// The resource of VirtualServices.
pub fn api_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk(GROUP, VERSION, KIND), "virtualservices")
}

/// The VirtualService named as `meta` says routing as `routes` says.
///
/// Fails with [`RuntimeError::Invalid`] naming the field when there is no host or destination, or the weights do
/// not add up to 100.
pub fn virtual_service(meta: &Metadata, routes: &VirtualService) -> Result<DynamicObject, RuntimeError> {
    let invalid = |field: &str, message: String| RuntimeError::Invalid {
        field: field.to_owned(),
        message,
    };
    if routes.hosts.is_empty() {
        return Err(invalid("hosts", "is empty; give the host it answers for".to_owned()));
    }
    if routes.destinations.is_empty() {
        return Err(invalid(
            "destinations",
            "is empty; give a Service to route to".to_owned(),
        ));
    }
    let total: u32 = routes.destinations.iter().map(|d| d.weight).sum();
    if total != 100 {
        return Err(invalid(
            "destinations",
            format!("weights add up to {total}; they must add up to 100, e.g. 90 and 10"),
        ));
    }
    let route: Vec<_> = routes
        .destinations
        .iter()
        .map(|d| json!({"destination": {"host": d.host, "port": {"number": d.port}}, "weight": d.weight}))
        .collect();
    let mut spec = json!({"hosts": routes.hosts, "http": [{"route": route}]});
    if !routes.gateways.is_empty() {
        spec["gateways"] = json!(routes.gateways);
    }
    let mut object = DynamicObject::new(&meta.key.name, &api_resource()).data(json!({"spec": spec}));
    object.metadata = meta.object_meta();
    Ok(object)
}
