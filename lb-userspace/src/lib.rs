//! xlb's userspace: the agent that keeps the kernel maps equal to the Kubernetes objects, and
//! the CLI that reads them back.
pub mod agent;
pub mod cli;
pub mod datapath;
pub mod ebpf;
pub mod events;
pub mod http;
pub mod kube_source;
pub mod maglev;
pub mod manifests;
pub mod metrics;
pub mod model;
pub mod node;
pub mod packet;
pub mod pinlock;
pub mod reconcile;
pub mod sockterm;
pub mod trace;

/// A hash map with a fast, non-cryptographic hasher (foldhash), for the model's and the
/// reconciler's maps: their keys come from the API server and the agent's own state, and they
/// are hashed on every sync.
pub(crate) type HashMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;
