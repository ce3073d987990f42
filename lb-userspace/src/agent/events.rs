//! Kubernetes Events for the objects the agent rejects: a Warning event `Rejected` on the
//! Service, EndpointSlice or Pod, with the reason as its note, so that `kubectl describe` shows
//! why xlb does not serve it (the log and the metric `xlb_rejected_objects` say it too).
//!
//! Every node's agent sees the same objects and rejects the same ones. So that a cluster of N
//! nodes does not write N events for each, an event's name is derived from the object's uid and
//! the reason: the first agent creates it, and the API server answers the others 409
//! AlreadyExists, which they take as done. An event is written when an object is rejected, or
//! rejected for another reason than before; not again at every sync.
//!
//! Writing goes through a task of its own with a bounded queue: a slow or refusing API server
//! never holds up a sync. At most [`PER_SYNC`] events are queued per sync; the rest are in the
//! log. Failures are logged (the ClusterRole of deploy/ grants `create` on events.k8s.io
//! events).
use std::collections::BTreeSet;

use k8s_openapi::{
    api::{core::v1::ObjectReference, events::v1::Event},
    apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta},
    jiff::Timestamp,
};
use kube::{Api, Client, api::PostParams};
use tokio::sync::mpsc;
use tracing::{debug, warn};

use crate::model::{Rejection, incremental::IncrementalModel};

/// The most events queued by one sync.
pub const PER_SYNC: usize = 50;
/// `reportingController` of the events.
pub const CONTROLLER: &str = "xlb.io/agent";

/// (kind, namespace, name, reason) of a rejection: an object can have several, one per part
/// left out.
pub type RejectionKey = (&'static str, String, String, String);

/// Reports rejections as events; see the module's documentation.
pub struct EventReporter {
    tx: mpsc::Sender<Event>,
    /// The rejections last reported that still hold.
    reported: BTreeSet<RejectionKey>,
    instance: String,
    /// This node's name: capacity events are about it.
    node: Option<String>,
    /// The capacity flag last reported in an event while it holds.
    capacity_reported: Option<&'static str>,
}

impl EventReporter {
    /// Starts the writer task (on the current tokio runtime). `node` names the reporting
    /// instance.
    pub fn start(client: Client, node: Option<&str>) -> Self {
        let (tx, mut rx) = mpsc::channel::<Event>(PER_SYNC * 4);
        tokio::spawn(async move {
            let mut failures = 0u64;
            while let Some(ev) = rx.recv().await {
                let ns = ev.metadata.namespace.clone().unwrap_or_else(|| "default".into());
                match Api::<Event>::namespaced(client.clone(), &ns).create(&PostParams::default(), &ev).await
                {
                    Ok(_) => debug!(event = ?ev.metadata.name, "event written"),
                    // Another node's agent wrote it first.
                    Err(kube::Error::Api(s)) if s.code == 409 => {}
                    Err(e) => {
                        failures += 1;
                        // The first failure, then one in a hundred: a refusing API server must not
                        // flood the log.
                        if failures % 100 == 1 {
                            warn!(error = %e, failures, "cannot write an event about a rejected object");
                        }
                    }
                }
            }
        });
        let instance = format!("xlb-{}", node.unwrap_or("node"));
        Self {
            tx,
            reported: BTreeSet::new(),
            instance,
            node: node.map(str::to_owned),
            capacity_reported: None,
        }
    }

    /// Queues events for the objects of `rejected` that are newly rejected, or rejected for a
    /// new reason, and forgets the ones no longer rejected.
    pub fn report(&mut self, rejected: &[Rejection], objects: &IncrementalModel) {
        let fresh = changes(&mut self.reported, rejected);
        let mut queued = 0;
        for r in fresh {
            if queued == PER_SYNC {
                debug!(object = %format!("{} {}/{}", r.kind, r.namespace, r.name), "event not written: too many this sync");
                continue;
            }
            let Some(reference) = objects.object_ref(r.kind, &r.namespace, &r.name) else { continue };
            let ev = event(r, reference, &self.instance, Timestamp::now());
            match self.tx.try_send(ev) {
                Ok(()) => queued += 1,
                Err(_) => {
                    // The writer is behind: leave it out of `reported`, so the next sync tries
                    // again.
                    self.reported.remove(&key(r));
                }
            }
        }
    }
}

fn key(r: &Rejection) -> RejectionKey {
    (r.kind, r.namespace.clone(), r.name.clone(), r.reason.clone())
}

impl EventReporter {
    /// A sync failed because a map is too small for the cluster (`flag` raises it; `why` is
    /// the error): a Warning event `CapacityExceeded` on this node's Node object, once while
    /// it holds. `None`: the maps hold the cluster (again).
    pub fn report_capacity(&mut self, flag: Option<&'static str>, why: &str) {
        if flag == self.capacity_reported {
            return;
        }
        self.capacity_reported = flag;
        let (Some(flag), Some(node)) = (flag, self.node.as_deref()) else { return };
        let ev = capacity_event(node, flag, why, &self.instance, Timestamp::now());
        if self.tx.try_send(ev).is_err() {
            self.capacity_reported = None; // the next failed sync tries again
        }
    }
}

/// The event about a map too small for the cluster, on node `node` (in namespace default, as
/// the kubelet writes its Node events).
pub fn capacity_event(node: &str, flag: &str, why: &str, instance: &str, now: Timestamp) -> Event {
    let regarding = ObjectReference {
        api_version: Some("v1".into()),
        kind: Some("Node".into()),
        name: Some(node.to_owned()),
        ..Default::default()
    };
    let name = format!("{node}.xlb-capacity-{:016x}", fnv1a(&[node.as_bytes(), flag.as_bytes()]));
    let note = format!("xlb cannot write the cluster's Services into its maps: {why}");
    warning(name, "default", "CapacityExceeded", note, regarding, instance, now)
}

/// A Warning event of the agent's, its note cut to the 1 kB the API server takes.
fn warning(
    name: String,
    namespace: &str,
    reason: &str,
    mut note: String,
    regarding: ObjectReference,
    instance: &str,
    now: Timestamp,
) -> Event {
    if note.len() > 1000 {
        let mut cut = 1000;
        while !note.is_char_boundary(cut) {
            cut -= 1;
        }
        note.truncate(cut);
    }
    Event {
        metadata: ObjectMeta {
            name: Some(name),
            namespace: Some(namespace.to_owned()),
            ..Default::default()
        },
        event_time: Some(MicroTime(now)),
        type_: Some("Warning".into()),
        reason: Some(reason.into()),
        action: Some("Program".into()),
        note: Some(note),
        regarding: Some(regarding),
        reporting_controller: Some(CONTROLLER.into()),
        reporting_instance: Some(instance.chars().take(128).collect()),
        ..Default::default()
    }
}

/// Updates `reported` to `rejected`, and returns the rejections to report: those not in
/// `reported` before (an object newly rejected, or rejected for another reason, or another
/// part of it). The log (`agent::Syncer`) and the events both say each rejection once.
pub fn changes<'a>(reported: &mut BTreeSet<RejectionKey>, rejected: &'a [Rejection]) -> Vec<&'a Rejection> {
    let mut now = BTreeSet::new();
    let mut fresh = Vec::new();
    for r in rejected {
        let k = key(r);
        if !reported.contains(&k) && !now.contains(&k) {
            fresh.push(r);
        }
        now.insert(k);
    }
    *reported = now;
    fresh
}

/// The event about `r`, named after the object's uid and the reason (see the module's
/// documentation).
pub fn event(r: &Rejection, regarding: ObjectReference, instance: &str, now: Timestamp) -> Event {
    let uid = regarding.uid.clone().unwrap_or_default();
    let name =
        format!("{}.xlb-{:016x}", r.name, fnv1a(&[uid.as_bytes(), r.kind.as_bytes(), r.reason.as_bytes()]));
    let note = match r.part {
        None => format!("xlb does not serve this {}: {}", r.kind, r.reason),
        Some(part) => format!("xlb serves this {} without its {part}: {}", r.kind, r.reason),
    };
    let reason = if r.part.is_some() { "PartlyRejected" } else { "Rejected" };
    warning(name, &r.namespace, reason, note, regarding, instance, now)
}

/// FNV-1a over the parts (with a separator), for event names that every agent derives alike.
fn fnv1a(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for p in parts {
        for b in p.iter().chain(&[0u8]) {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rej(kind: &'static str, name: &str, reason: &str) -> Rejection {
        Rejection::whole(kind, "default", name, reason.into())
    }

    #[test]
    fn only_new_rejections_and_new_reasons_are_reported() {
        let mut reported = BTreeSet::new();
        let a = rej("Service", "a", "no ports");
        let b = rej("Service", "b", "nodePort 99999 is out of range");
        assert_eq!(changes(&mut reported, &[a.clone(), b.clone()]).len(), 2);
        assert!(changes(&mut reported, &[a.clone(), b.clone()]).is_empty(), "nothing new");
        let b2 = rej("Service", "b", "nodePort 30001 is taken by default/c");
        let both = [a.clone(), b2.clone()];
        let fresh = changes(&mut reported, &both);
        assert_eq!(fresh.len(), 1);
        assert_eq!(fresh[0].reason, b2.reason);
        // Fixed, then broken again: reported again.
        assert!(changes(&mut reported, std::slice::from_ref(&b2)).is_empty());
        assert_eq!(changes(&mut reported, &[a, b2]).len(), 1);
        // The same kind and name in another kind is another object.
        let slice = [rej("EndpointSlice", "a", "no label")];
        assert_eq!(changes(&mut reported, &slice).len(), 1);
        // Two parts of one object left out: each said once, and not again at the next sync.
        let np = Rejection { part: Some("nodePort"), ..rej("Service", "c", "nodePort 1 is outside") };
        let ext = Rejection { part: Some("externalIP"), ..rej("Service", "c", "externalIP 0.0.0.0") };
        let parts = [np.clone(), ext];
        assert_eq!(changes(&mut reported, &parts).len(), 2);
        assert!(changes(&mut reported, &parts).is_empty());
        assert!(changes(&mut reported, &[np]).is_empty(), "one part fixed: nothing new to say");
    }

    #[test]
    fn a_partial_rejection_says_which_part_is_left_out() {
        let r = Rejection { part: Some("nodePort"), ..rej("Service", "web", "nodePort 40000 is outside") };
        let e = event(&r, ObjectReference::default(), "xlb-node-1", Timestamp::now());
        assert_eq!(e.reason.as_deref(), Some("PartlyRejected"));
        assert_eq!(
            e.note.as_deref(),
            Some("xlb serves this Service without its nodePort: nodePort 40000 is outside")
        );
    }

    #[test]
    fn every_agent_names_an_event_alike_and_it_is_valid() {
        let r = rej("Service", "web", &"x".repeat(2000));
        let reference = ObjectReference {
            api_version: Some("v1".into()),
            kind: Some("Service".into()),
            name: Some("web".into()),
            namespace: Some("default".into()),
            uid: Some("5f1c".into()),
            ..Default::default()
        };
        let e1 = event(&r, reference.clone(), "xlb-node-1", Timestamp::now());
        let e2 = event(&r, reference.clone(), "xlb-node-2", Timestamp::now());
        assert_eq!(e1.metadata.name, e2.metadata.name, "the same name on every node");
        let other = event(&rej("Service", "web", "no ports"), reference, "xlb-node-1", Timestamp::now());
        assert_ne!(e1.metadata.name, other.metadata.name, "another reason, another event");
        assert!(e1.note.as_ref().unwrap().len() <= 1000);
        assert_eq!(e1.type_.as_deref(), Some("Warning"));
        assert_eq!(e1.metadata.namespace.as_deref(), Some("default"));
        let name = e1.metadata.name.unwrap();
        assert!(name.len() <= 253 && name.starts_with("web.xlb-"), "{name}");
    }
}
