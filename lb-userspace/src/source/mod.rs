//! Where Services, EndpointSlices and Pods come from: the API server ([`kube`], list and watch)
//! or a directory of manifests ([`manifests`], standalone). Both hand the agent what changed
//! since it last looked ([`Delta`]), not the whole cluster each time.
pub mod kube;
pub mod manifests;
pub mod slim;

use std::{collections::BTreeMap, sync::Arc};

use crate::{HashMap, model::incremental::Key};

/// The label that leaves a Service (and the EndpointSlices the controller copies it to) to
/// another proxy, as kube-proxy and Cilium honour it.
pub const SERVICE_PROXY_NAME_LABEL: &str = "service.kubernetes.io/service-proxy-name";

/// The label the EndpointSlice controller puts on the slices of a headless Service (no
/// clusterIP: nothing for a proxy to do), which kube-proxy does not download either.
pub const HEADLESS_LABEL: &str = "service.kubernetes.io/headless";

/// Which Services this agent serves, by their [`SERVICE_PROXY_NAME_LABEL`]: by default those
/// without the label (kube-proxy's rule); with `--service-proxy-name NAME`, only those whose
/// label has that value, so that a cluster can run xlb beside another proxy, Service by
/// Service. From the API server the rule is a label selector on the watches (such objects are
/// never downloaded); from manifests it is applied as the documents are read.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ProxyName(Option<String>);

impl ProxyName {
    /// `None`: the Services without the label. A name must be a valid label value.
    pub fn new(name: Option<String>) -> Result<Self, String> {
        if let Some(n) = &name {
            let ok = !n.is_empty()
                && n.len() <= 63
                && n.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
                && n.as_bytes()[0].is_ascii_alphanumeric()
                && n.as_bytes()[n.len() - 1].is_ascii_alphanumeric();
            if !ok {
                return Err(format!(
                    "{n:?} is not a label value (at most 63 characters: letters, digits, '-', '_' and '.', beginning and ending with a letter or digit)"
                ));
            }
        }
        Ok(Self(name))
    }

    pub fn name(&self) -> Option<&str> {
        self.0.as_deref()
    }

    /// The label selector of the Services' watch.
    pub fn service_selector(&self) -> String {
        match &self.0 {
            None => format!("!{SERVICE_PROXY_NAME_LABEL}"),
            Some(n) => format!("{SERVICE_PROXY_NAME_LABEL}={n}"),
        }
    }

    /// The label selector of the EndpointSlices' watch. With a name, the slices are not
    /// selected by it: hand-made slices of a selectorless Service need not carry the Service's
    /// labels, and the slices of Services not served are dropped by the model.
    pub fn slice_selector(&self) -> String {
        match &self.0 {
            None => format!("!{SERVICE_PROXY_NAME_LABEL},!{HEADLESS_LABEL}"),
            Some(_) => format!("!{HEADLESS_LABEL}"),
        }
    }

    /// Whether a Service with these labels is served (as [`Self::service_selector`] selects).
    pub fn serves_service(&self, labels: Option<&BTreeMap<String, String>>) -> bool {
        let value = labels.and_then(|l| l.get(SERVICE_PROXY_NAME_LABEL));
        match &self.0 {
            None => value.is_none(),
            Some(n) => value == Some(n),
        }
    }

    /// Whether an EndpointSlice (or Endpoints) with these labels is read (as
    /// [`Self::slice_selector`] selects).
    pub fn reads_slice(&self, labels: Option<&BTreeMap<String, String>>) -> bool {
        let has = |k: &str| labels.is_some_and(|l| l.contains_key(k));
        !has(HEADLESS_LABEL) && (self.0.is_some() || !has(SERVICE_PROXY_NAME_LABEL))
    }
}

/// What a source has seen of one kind of object since the agent last took it: a complete list
/// (the first one, a relist after 410 Gone, a directory read again), then the objects changed
/// after it, by key (the newest version; `None`: deleted).
pub struct Delta<K> {
    pub list: Option<Vec<Arc<K>>>,
    pub changes: HashMap<Key, Option<Arc<K>>>,
}

impl<K> Default for Delta<K> {
    fn default() -> Self {
        Self { list: None, changes: HashMap::default() }
    }
}

impl<K> Delta<K> {
    pub fn is_empty(&self) -> bool {
        self.list.is_none() && self.changes.is_empty()
    }

    /// A whole list, taken as it is.
    pub fn listed(list: Vec<Arc<K>>) -> Self {
        Self { list: Some(list), changes: HashMap::default() }
    }
}
