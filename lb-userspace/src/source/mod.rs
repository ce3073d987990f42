//! Where Services, EndpointSlices and Pods come from: the API server ([`kube`], list and watch)
//! or a directory of manifests ([`manifests`], standalone). Both hand the agent what changed
//! since it last looked ([`Delta`]), not the whole cluster each time.
pub mod kube;
pub mod manifests;
pub mod slim;

use std::sync::Arc;

use crate::{HashMap, model::incremental::Key};

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
