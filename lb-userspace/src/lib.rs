//! xlb's userspace: the agent that keeps the kernel maps equal to the Kubernetes objects, and
//! the CLI that reads them back.
//!
//! A Service goes from the API server to a map through these rooms, in this order:
//! - [`source`]: the objects, from the API server ([`source::kube`]) or a manifests directory
//!   ([`source::manifests`]);
//! - [`model`]: the pure model, objects in, the frontends and backends the datapath must hold
//!   out (no I/O);
//! - [`reconcile`]: the difference between the model and the maps, written in an order that
//!   never shows a packet a half-written service (with the Maglev tables, [`reconcile::maglev`]);
//! - [`datapath`]: the kernel maps behind one trait (pinned, in memory, fault-injecting), and
//!   loading and attaching the programs ([`datapath::ebpf`], [`datapath::pinlock`]);
//! - [`agent`]: the process that runs it all (`xlb agent`): the control loop, HTTP endpoints,
//!   metrics, events, socket termination, the node's addresses;
//! - [`cli`]: the listings, `xlb describe` and `xlb trace` (with its frame builder,
//!   [`cli::packet`]), reading the pinned maps.
pub mod agent;
pub mod cli;
pub mod datapath;
pub mod model;
pub mod reconcile;
pub mod source;

/// A hash map with a fast, non-cryptographic hasher (foldhash), for the model's and the
/// reconciler's maps: their keys come from the API server and the agent's own state, and they
/// are hashed on every sync.
pub(crate) type HashMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;

/// A hash set with the hasher of [`HashMap`].
pub(crate) type HashSet<K> = std::collections::HashSet<K, foldhash::fast::RandomState>;
