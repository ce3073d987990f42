//! Services and EndpointSlices read from the API server with only what xlb uses (as Cilium's
//! "slim" types do): the rest of each object (managed fields, annotations, owners, an endpoint's
//! pod reference, zone and hostname, a Service's selector...) is skipped while the JSON is read,
//! never allocated. A first list of 100,000 Services and their slices is most of an agent's
//! start; decoding what is then thrown away was a good part of it.
//!
//! [`SlimService`] and [`SlimSlice`] read as the k8s-openapi objects with those fields empty; the
//! model reads a slim object as it reads the full one.
use std::{borrow::Cow, collections::BTreeMap, fmt};

use k8s_openapi::{
    api::{
        core::v1::{Service, ServiceSpec, ServiceStatus},
        discovery::v1::{EndpointConditions, EndpointPort, EndpointSlice},
    },
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use serde::{
    Deserialize, Deserializer,
    de::{IgnoredAny, MapAccess, Visitor},
};

use crate::model::SERVICE_NAME_LABEL;

/// What xlb reads of an object's metadata: its name, namespace, identity (uid, version), and of
/// its labels the one that names a slice's Service.
#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct Meta {
    name: Option<String>,
    namespace: Option<String>,
    uid: Option<String>,
    resource_version: Option<String>,
    labels: Option<ServiceNameLabel>,
}

impl From<Meta> for ObjectMeta {
    fn from(m: Meta) -> Self {
        ObjectMeta {
            name: m.name,
            namespace: m.namespace,
            uid: m.uid,
            resource_version: m.resource_version,
            labels: m.labels.and_then(|l| l.0).map(|v| BTreeMap::from([(SERVICE_NAME_LABEL.to_string(), v)])),
            ..Default::default()
        }
    }
}

/// The labels, of which only [`SERVICE_NAME_LABEL`]'s value is kept.
struct ServiceNameLabel(Option<String>);

impl<'de> Deserialize<'de> for ServiceNameLabel {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = ServiceNameLabel;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a map of labels")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut found = None;
                while let Some(k) = map.next_key::<Cow<'de, str>>()? {
                    if k == SERVICE_NAME_LABEL {
                        found = Some(map.next_value::<String>()?);
                    } else {
                        map.next_value::<IgnoredAny>()?;
                    }
                }
                Ok(ServiceNameLabel(found))
            }
        }
        d.deserialize_map(V)
    }
}

/// A Service: metadata as [`Meta`]; its spec but the selector, its status but the conditions.
#[derive(Clone, Debug, PartialEq)]
pub struct SlimService(pub Service);

impl<'de> Deserialize<'de> for SlimService {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        struct Wire {
            #[serde(default)]
            metadata: Meta,
            spec: Option<ServiceSpec>,
            status: Option<ServiceStatus>,
        }
        let w = Wire::deserialize(d)?;
        let mut svc = Service { metadata: w.metadata.into(), spec: w.spec, status: w.status };
        if let Some(spec) = svc.spec.as_mut() {
            spec.selector = None;
        }
        if let Some(status) = svc.status.as_mut() {
            status.conditions = None;
        }
        Ok(SlimService(svc))
    }
}

/// An EndpointSlice: metadata as [`Meta`]; of each endpoint its addresses, conditions and node.
#[derive(Clone, Debug, PartialEq)]
pub struct SlimSlice(pub EndpointSlice);

impl<'de> Deserialize<'de> for SlimSlice {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(rename_all = "camelCase")]
        struct Wire {
            #[serde(default)]
            metadata: Meta,
            #[serde(default)]
            address_type: String,
            endpoints: Option<Vec<Endpoint>>,
            ports: Option<Vec<EndpointPort>>,
        }
        #[derive(Deserialize)]
        #[serde(rename_all = "camelCase")]
        struct Endpoint {
            addresses: Option<Vec<String>>,
            conditions: Option<EndpointConditions>,
            node_name: Option<String>,
            hints: Option<k8s_openapi::api::discovery::v1::EndpointHints>,
        }
        let w = Wire::deserialize(d)?;
        let endpoints = w
            .endpoints
            .unwrap_or_default()
            .into_iter()
            .map(|e| k8s_openapi::api::discovery::v1::Endpoint {
                addresses: e.addresses.unwrap_or_default(),
                conditions: e.conditions,
                node_name: e.node_name,
                hints: e.hints,
                ..Default::default()
            })
            .collect();
        Ok(SlimSlice(EndpointSlice {
            metadata: w.metadata.into(),
            address_type: w.address_type,
            endpoints,
            ports: w.ports,
        }))
    }
}

/// As the type it reads (kind, group, version, plural), for kube-rs' requests.
macro_rules! resource_as {
    ($slim:ty, $full:ty, $scope:ty) => {
        impl kube::Resource for $slim {
            type DynamicType = ();
            type Scope = $scope;
            fn kind(dt: &()) -> Cow<'_, str> {
                <$full as kube::Resource>::kind(dt)
            }
            fn group(dt: &()) -> Cow<'_, str> {
                <$full as kube::Resource>::group(dt)
            }
            fn version(dt: &()) -> Cow<'_, str> {
                <$full as kube::Resource>::version(dt)
            }
            fn plural(dt: &()) -> Cow<'_, str> {
                <$full as kube::Resource>::plural(dt)
            }
            fn meta(&self) -> &ObjectMeta {
                &self.0.metadata
            }
            fn meta_mut(&mut self) -> &mut ObjectMeta {
                &mut self.0.metadata
            }
        }
    };
}

resource_as!(SlimService, Service, k8s_openapi::NamespaceResourceScope);
resource_as!(SlimSlice, EndpointSlice, k8s_openapi::NamespaceResourceScope);

#[cfg(test)]
mod tests {
    use super::*;

    fn full_service() -> serde_json::Value {
        serde_json::json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {
                "name": "web", "namespace": "shop", "uid": "0b6a2f8e-4d3c-4a57-9a51-3e2f1c0d9b7a",
                "resourceVersion": "4711", "generation": 3, "creationTimestamp": "2026-01-02T03:04:05Z",
                "labels": {"app": "web", "kubernetes.io/service-name": "odd-but-kept", "tier": "front"},
                "annotations": {"kubectl.kubernetes.io/last-applied-configuration": "{\"big\": true}"},
                "ownerReferences": [{"apiVersion": "v1", "kind": "X", "name": "o", "uid": "u"}],
                "finalizers": ["f"],
                "managedFields": [{"manager": "kubectl", "operation": "Apply", "fieldsType": "FieldsV1",
                    "fieldsV1": {"f:spec": {"f:ports": {}}}}]
            },
            "spec": {
                "type": "LoadBalancer", "clusterIP": "198.18.0.10", "clusterIPs": ["198.18.0.10"],
                "selector": {"app": "web"}, "sessionAffinity": "ClientIP",
                "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 60}},
                "externalTrafficPolicy": "Local", "healthCheckNodePort": 31000,
                "ports": [{"name": "http", "port": 80, "targetPort": "web", "protocol": "TCP", "nodePort": 30080}],
                "externalIPs": ["198.19.0.5"], "loadBalancerSourceRanges": ["198.18.0.0/16"]
            },
            "status": {
                "loadBalancer": {"ingress": [{"ip": "198.19.1.1", "ipMode": "VIP"}]},
                "conditions": [{"type": "Ready", "status": "True", "lastTransitionTime": "2026-01-02T03:04:05Z",
                    "reason": "r", "message": "m"}]
            }
        })
    }

    fn full_slice() -> serde_json::Value {
        serde_json::json!({
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {
                "name": "web-abc12", "namespace": "shop", "uid": "1b6a2f8e-4d3c-4a57-9a51-3e2f1c0d9b7a",
                "resourceVersion": "4712", "generateName": "web-",
                "labels": {"kubernetes.io/service-name": "web", "endpointslice.kubernetes.io/managed-by": "c"},
                "ownerReferences": [{"apiVersion": "v1", "kind": "Service", "name": "web", "uid": "u"}]
            },
            "addressType": "IPv4",
            "endpoints": [
                {"addresses": ["198.18.1.1"], "conditions": {"ready": true, "serving": true, "terminating": false},
                 "nodeName": "n1", "zone": "z", "hostname": "h",
                 "targetRef": {"kind": "Pod", "name": "web-1", "namespace": "shop", "uid": "p"},
                 "hints": {"forZones": [{"name": "z"}]}},
                {"addresses": ["198.18.1.2", "198.18.1.3"], "conditions": {"ready": false, "terminating": true}},
                {"addresses": []}
            ],
            "ports": [{"name": "web", "port": 8080, "protocol": "TCP", "appProtocol": "http"}]
        })
    }

    /// What xlb reads of an object's metadata, as read in full.
    fn kept_meta(m: &ObjectMeta) -> ObjectMeta {
        let labels = m.labels.as_ref().and_then(|l| l.get(SERVICE_NAME_LABEL));
        ObjectMeta {
            name: m.name.clone(),
            namespace: m.namespace.clone(),
            uid: m.uid.clone(),
            resource_version: m.resource_version.clone(),
            labels: labels.map(|v| BTreeMap::from([(SERVICE_NAME_LABEL.to_string(), v.clone())])),
            ..Default::default()
        }
    }

    #[test]
    fn slim_objects_read_as_full_ones_less_what_xlb_never_reads() {
        let full: Service = serde_json::from_value(full_service()).unwrap();
        let mut want = full.clone();
        want.metadata = kept_meta(&full.metadata);
        want.spec.as_mut().unwrap().selector = None;
        want.status.as_mut().unwrap().conditions = None;
        let slim: SlimService = serde_json::from_value(full_service()).unwrap();
        assert_eq!(slim.0, want);
        // What is left is what the model reads of it.
        let spec = slim.0.spec.as_ref().unwrap();
        assert!(spec.session_affinity_config.is_some() && spec.load_balancer_source_ranges.is_some());
        assert_eq!(slim.0.metadata.labels.as_ref().unwrap()[SERVICE_NAME_LABEL], "odd-but-kept");

        let full: EndpointSlice = serde_json::from_value(full_slice()).unwrap();
        let mut want = full.clone();
        want.metadata = kept_meta(&full.metadata);
        want.endpoints = full
            .endpoints
            .iter()
            .map(|e| k8s_openapi::api::discovery::v1::Endpoint {
                addresses: e.addresses.clone(),
                conditions: e.conditions.clone(),
                node_name: e.node_name.clone(),
                hints: e.hints.clone(),
                ..Default::default()
            })
            .collect();
        let slim: SlimSlice = serde_json::from_value(full_slice()).unwrap();
        assert_eq!(slim.0, want);
        assert_eq!(slim.0.endpoints.len(), 3);
        assert_eq!(slim.0.endpoints[1].addresses.len(), 2);
        assert_eq!(slim.0.metadata.labels.as_ref().unwrap()[SERVICE_NAME_LABEL], "web");
    }

    #[test]
    fn nulls_and_absences_read_as_empty() {
        let slim: SlimSlice = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "s", "labels": null}, "addressType": "IPv6", "endpoints": null, "ports": null
        }))
        .unwrap();
        assert!(slim.0.endpoints.is_empty() && slim.0.ports.is_none() && slim.0.metadata.labels.is_none());
        let slim: SlimService =
            serde_json::from_value(serde_json::json!({"metadata": {"name": "s"}})).unwrap();
        assert_eq!(slim.0.metadata.name.as_deref(), Some("s"));
        assert!(slim.0.spec.is_none());
        // Not a map where labels are: an error, as the full type gives.
        assert!(serde_json::from_value::<SlimSlice>(serde_json::json!({"metadata": {"labels": 3}})).is_err());
    }
}
