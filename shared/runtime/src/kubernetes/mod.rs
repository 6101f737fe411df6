//! The Kubernetes runtime (being written).
