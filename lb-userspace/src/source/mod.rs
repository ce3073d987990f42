//! Where Services, EndpointSlices and Pods come from: the API server ([`kube`], list and watch)
//! or a directory of manifests ([`manifests`], standalone).
pub mod kube;
pub mod manifests;
