//! The identity every object Cube makes carries: key, labels (with `managed-by=cube`), annotations and owner.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::Resource;

use crate::error::RuntimeError;
use crate::spec::{ObjectKey, Owner, WorkloadSpec, labels};

/// Who an object is and who owns it: the input of every object builder of this module.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Metadata {
    /// Where it lives and what it is called.
    pub key: ObjectKey,
    /// Its labels; [`labels::MANAGED_BY`]`=cube` is added when missing.
    pub labels: BTreeMap<String, String>,
    /// Its annotations.
    pub annotations: BTreeMap<String, String>,
    /// The object whose deletion deletes this one.
    pub owner: Option<Owner>,
}

impl Metadata {
    /// The metadata of `key` with `labels` (`managed-by=cube` added) and no annotations or owner.
    ///
    /// Fails with [`RuntimeError::Invalid`] naming `labels` when they say another manager manages the object.
    pub fn new(key: ObjectKey, labels: BTreeMap<String, String>) -> Result<Self, RuntimeError> {
        Self {
            key,
            labels,
            ..Self::default()
        }
        .checked()
    }

    /// The metadata of the workload `spec` (its key, labels, annotations and owner), for the objects that serve it.
    ///
    /// Fails with [`RuntimeError::Invalid`] naming `labels` when they say another manager manages the object.
    pub fn of(spec: &WorkloadSpec) -> Result<Self, RuntimeError> {
        Self {
            key: spec.key.clone(),
            labels: spec.labels.clone(),
            annotations: spec.annotations.clone(),
            owner: spec.owner.clone(),
        }
        .checked()
    }

    /// The same metadata owned by `owner`.
    #[must_use]
    pub fn owned_by(mut self, owner: Owner) -> Self {
        self.owner = Some(owner);
        self
    }

    /// Adds `managed-by=cube` to the labels, or fails when they name another manager.
    fn checked(mut self) -> Result<Self, RuntimeError> {
        match self.labels.get(labels::MANAGED_BY) {
            None => {
                self.labels
                    .insert(labels::MANAGED_BY.to_owned(), labels::CUBE.to_owned());
            }
            Some(manager) if manager == labels::CUBE => {}
            Some(manager) => {
                return Err(RuntimeError::Invalid {
                    field: "labels".to_owned(),
                    message: format!(
                        "{} is {manager:?}; objects Cube makes are managed by {:?}",
                        labels::MANAGED_BY,
                        labels::CUBE
                    ),
                });
            }
        }
        if self.key.name.is_empty() {
            return Err(RuntimeError::Invalid {
                field: "key.name".to_owned(),
                message: "is empty; objects are named with a DNS-1123 label, e.g. train-42".to_owned(),
            });
        }
        if self.key.namespace.is_empty() {
            return Err(RuntimeError::Invalid {
                field: "key.namespace".to_owned(),
                message: "is empty; give the namespace the placement chose, e.g. pipeline".to_owned(),
            });
        }
        Ok(self)
    }

    /// The owner references the object carries: its owner's, if it has one.
    pub(crate) fn owner_references(&self) -> Option<Vec<OwnerReference>> {
        self.owner.as_ref().map(|owner| {
            vec![OwnerReference {
                api_version: owner.api_version.clone(),
                kind: owner.kind.clone(),
                name: owner.name.clone(),
                uid: owner.uid.clone(),
                block_owner_deletion: None,
                controller: None,
            }]
        })
    }

    /// The Kubernetes object metadata: name, namespace, labels, annotations, owner references.
    pub fn object_meta(&self) -> ObjectMeta {
        ObjectMeta {
            name: Some(self.key.name.clone()),
            namespace: Some(self.key.namespace.clone()),
            labels: Some(self.labels.clone()),
            annotations: (!self.annotations.is_empty()).then(|| self.annotations.clone()),
            owner_references: self.owner_references(),
            ..ObjectMeta::default()
        }
    }
}

/// The owner of children of `object`, as an object the API server returned (with its uid); `None` when the object
/// has no name or uid yet (it was never stored).
pub fn owner_of<K>(object: &K) -> Option<Owner>
where
    K: Resource<DynamicType = ()>,
{
    let meta = object.meta();
    Some(Owner {
        api_version: K::api_version(&()).into_owned(),
        kind: K::kind(&()).into_owned(),
        name: meta.name.clone()?,
        uid: meta.uid.clone()?,
    })
}
