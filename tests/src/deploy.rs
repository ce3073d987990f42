//! deploy/: its manifests, read as the API server would take them. Every document is checked
//! against the Kubernetes API types of k8s-openapi, strictly: a document must deserialize into
//! the type of its apiVersion and kind (wrong types and a wrong kind fail there), and
//! serializing the typed value back must give the same fields: a field the type does not know,
//! such as a misspelt one, is lost, and a required field the document lacks is added.
use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, anyhow, bail};
use k8s_openapi::api::{
    apps::v1::DaemonSet,
    core::v1::{ConfigMap, Container, Namespace, ServiceAccount},
    rbac::v1::{ClusterRole, ClusterRoleBinding, PolicyRule},
};
use serde::{Serialize, de::DeserializeOwned};
use serde_json::Value;

/// The deploy/ directory of this checkout.
pub fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace root").join("deploy")
}

/// One document of a manifest file, typed.
#[derive(Debug, Clone)]
pub enum Object {
    Namespace(Namespace),
    ServiceAccount(ServiceAccount),
    ClusterRole(ClusterRole),
    ClusterRoleBinding(ClusterRoleBinding),
    ConfigMap(ConfigMap),
    DaemonSet(Box<DaemonSet>),
}

/// The manifests of deploy/ (its kustomization aside), by file, in order.
#[derive(Debug, Clone)]
pub struct Deploy {
    pub files: Vec<(String, Vec<Object>)>,
}

/// The paths of `doc` (a JSON value) that `back` lacks: the fields a typed round trip lost.
pub fn lost_fields(doc: &Value, back: &Value, path: &str, out: &mut Vec<String>) {
    match (doc, back) {
        (Value::Object(a), Value::Object(b)) => {
            for (k, v) in a {
                let p = format!("{path}.{k}");
                match b.get(k) {
                    Some(bv) => lost_fields(v, bv, &p, out),
                    None => out.push(p),
                }
            }
        }
        (Value::Array(a), Value::Array(b)) => {
            for (i, v) in a.iter().enumerate() {
                match b.get(i) {
                    Some(bv) => lost_fields(v, bv, &format!("{path}[{i}]"), out),
                    None => out.push(format!("{path}[{i}]")),
                }
            }
        }
        _ => {}
    }
}

/// `doc` as a `T`, strictly (see the module's documentation).
pub fn strict<T: DeserializeOwned + Serialize>(doc: &Value) -> anyhow::Result<T> {
    let typed: T =
        serde_json::from_value(doc.clone()).map_err(|e| anyhow!("does not match the schema: {e}"))?;
    let back = serde_json::to_value(&typed)?;
    let mut lost = Vec::new();
    lost_fields(doc, &back, "", &mut lost);
    if !lost.is_empty() {
        bail!("fields the schema does not have: {}", lost.join(", "));
    }
    // The types fill in a required field the document lacks (with its default) and always
    // write it back, while optional fields are written only when set: a field the round trip
    // added is a required one the document misses.
    let mut missing = Vec::new();
    lost_fields(&back, doc, "", &mut missing);
    if !missing.is_empty() {
        bail!("required fields missing: {}", missing.join(", "));
    }
    Ok(typed)
}

/// One document, typed by its apiVersion and kind.
pub fn object(doc: &Value) -> anyhow::Result<Object> {
    let av = doc["apiVersion"].as_str().unwrap_or("");
    let kind = doc["kind"].as_str().unwrap_or("");
    Ok(match (av, kind) {
        ("v1", "Namespace") => Object::Namespace(strict(doc)?),
        ("v1", "ServiceAccount") => Object::ServiceAccount(strict(doc)?),
        ("v1", "ConfigMap") => Object::ConfigMap(strict(doc)?),
        ("rbac.authorization.k8s.io/v1", "ClusterRole") => Object::ClusterRole(strict(doc)?),
        ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding") => Object::ClusterRoleBinding(strict(doc)?),
        ("apps/v1", "DaemonSet") => Object::DaemonSet(Box::new(strict(doc)?)),
        _ => bail!("unexpected apiVersion {av:?} kind {kind:?}"),
    })
}

/// The documents of a YAML text, as JSON values (empty documents skipped).
pub fn documents(text: &str) -> anyhow::Result<Vec<Value>> {
    use serde::Deserialize as _;
    let mut out = Vec::new();
    for d in serde_yaml::Deserializer::from_str(text) {
        let v = Value::deserialize(d)?;
        if !v.is_null() {
            out.push(v);
        }
    }
    Ok(out)
}

impl Deploy {
    /// Reads and checks every manifest of `dir` but kustomization.yaml.
    pub fn load(dir: &Path) -> anyhow::Result<Self> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .with_context(|| format!("reading {}", dir.display()))?
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .filter(|n| (n.ends_with(".yaml") || n.ends_with(".yml")) && n != "kustomization.yaml")
            .collect();
        names.sort();
        let mut files = Vec::new();
        for name in names {
            let text = std::fs::read_to_string(dir.join(&name))?;
            let mut objs = Vec::new();
            for (i, doc) in documents(&text).with_context(|| format!("{name}: not YAML"))?.iter().enumerate()
            {
                objs.push(object(doc).with_context(|| format!("{name}, document {}", i + 1))?);
            }
            files.push((name, objs));
        }
        Ok(Self { files })
    }

    pub fn objects(&self) -> impl Iterator<Item = &Object> {
        self.files.iter().flat_map(|(_, o)| o)
    }

    fn one<T>(&self, what: &str, pick: impl Fn(&Object) -> Option<&T>) -> anyhow::Result<&T> {
        let all: Vec<&T> = self.objects().filter_map(pick).collect();
        match all.as_slice() {
            [one] => Ok(one),
            _ => bail!("deploy/ has {} {what}, not one", all.len()),
        }
    }

    pub fn daemon_set(&self) -> anyhow::Result<&DaemonSet> {
        self.one("DaemonSet", |o| if let Object::DaemonSet(d) = o { Some(&**d) } else { None })
    }

    pub fn cluster_role(&self) -> anyhow::Result<&ClusterRole> {
        self.one("ClusterRole", |o| if let Object::ClusterRole(r) = o { Some(r) } else { None })
    }

    pub fn binding(&self) -> anyhow::Result<&ClusterRoleBinding> {
        self.one("ClusterRoleBinding", |o| if let Object::ClusterRoleBinding(b) = o { Some(b) } else { None })
    }

    pub fn config_map(&self) -> anyhow::Result<&ConfigMap> {
        self.one("ConfigMap", |o| if let Object::ConfigMap(c) = o { Some(c) } else { None })
    }

    pub fn service_account(&self) -> anyhow::Result<&ServiceAccount> {
        self.one("ServiceAccount", |o| if let Object::ServiceAccount(s) = o { Some(s) } else { None })
    }

    pub fn namespace(&self) -> anyhow::Result<&Namespace> {
        self.one("Namespace", |o| if let Object::Namespace(n) = o { Some(n) } else { None })
    }

    /// The DaemonSet's agent container (its only one).
    pub fn agent(&self) -> anyhow::Result<&Container> {
        let spec = self.daemon_set()?.spec.as_ref().and_then(|s| s.template.spec.as_ref());
        match spec.map(|s| s.containers.as_slice()) {
            Some([c]) => Ok(c),
            _ => bail!("the DaemonSet must have exactly one container"),
        }
    }

    /// The capabilities the agent container adds (as the kernel names them, CAP_ dropped).
    pub fn capabilities(&self) -> anyhow::Result<Vec<String>> {
        let caps = self.agent()?.security_context.as_ref().and_then(|s| s.capabilities.as_ref());
        Ok(caps.and_then(|c| c.add.clone()).unwrap_or_default())
    }

    /// The rules the ClusterRole grants.
    pub fn rules(&self) -> anyhow::Result<Vec<PolicyRule>> {
        Ok(self.cluster_role()?.rules.clone().unwrap_or_default())
    }

    /// The agent's environment as the kubelet would give it on node `node`: the ConfigMap's
    /// data (envFrom), then the container's own variables, which win. `valueFrom` fields
    /// resolve to `node` for spec.nodeName; other sources are an error.
    pub fn agent_env(&self, node: &str) -> anyhow::Result<BTreeMap<String, String>> {
        let c = self.agent()?;
        let cm = self.config_map()?;
        let mut env = BTreeMap::new();
        for from in c.env_from.iter().flatten() {
            let name = from.config_map_ref.as_ref().map(|r| r.name.as_str());
            if name != cm.metadata.name.as_deref() {
                bail!("envFrom names {name:?}, not the ConfigMap of deploy/");
            }
            env.extend(cm.data.clone().unwrap_or_default());
        }
        for e in c.env.iter().flatten() {
            let v = match (&e.value, &e.value_from) {
                (Some(v), None) => v.clone(),
                (None, Some(f)) if f.field_ref.as_ref().is_some_and(|r| r.field_path == "spec.nodeName") => {
                    node.to_owned()
                }
                _ => bail!("env {}: only values and spec.nodeName are understood here", e.name),
            };
            env.insert(e.name.clone(), v);
        }
        Ok(env)
    }

    /// The agent container's mounts: mountPath -> hostPath.
    pub fn host_mounts(&self) -> anyhow::Result<BTreeMap<String, String>> {
        let spec = self.daemon_set()?.spec.as_ref().and_then(|s| s.template.spec.clone()).unwrap_or_default();
        let mut out = BTreeMap::new();
        for m in self.agent()?.volume_mounts.iter().flatten() {
            let vol = spec.volumes.iter().flatten().find(|v| v.name == m.name);
            let host = vol
                .and_then(|v| v.host_path.as_ref())
                .ok_or_else(|| anyhow!("mount {} is not of a hostPath volume", m.mount_path))?;
            out.insert(m.mount_path.clone(), host.path.clone());
        }
        Ok(out)
    }
}

/// The host's path for the container's `path`, through the hostPath mounts `mounts` (from
/// [`Deploy::host_mounts`]): below a mount, or the parent of one (the agent's --proc-sys is the
/// parent of the /proc/sys/net it mounts). `None` when no mount leads there.
pub fn host_path(mounts: &BTreeMap<String, String>, path: &str) -> Option<String> {
    let below = mounts
        .iter()
        .filter(|(m, _)| path == m.as_str() || path.starts_with(&format!("{m}/")))
        .max_by_key(|(m, _)| m.len())
        .map(|(m, h)| format!("{h}{}", &path[m.len()..]));
    below.or_else(|| {
        mounts.iter().find_map(|(m, h)| {
            let rest = m.strip_prefix(path).filter(|r| r.starts_with('/'))?;
            h.strip_suffix(rest).map(str::to_owned)
        })
    })
}

/// The kustomization: only the fields deploy/ uses, any other is an error.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Kustomization {
    pub api_version: String,
    pub kind: String,
    pub resources: Vec<String>,
    #[serde(default)]
    pub images: Vec<KustomizeImage>,
}

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct KustomizeImage {
    pub name: String,
    pub new_name: Option<String>,
    pub new_tag: Option<String>,
    pub digest: Option<String>,
}

pub fn kustomization(dir: &Path) -> anyhow::Result<Kustomization> {
    let text = std::fs::read_to_string(dir.join("kustomization.yaml"))?;
    let k: Kustomization = serde_yaml::from_str(&text).context("kustomization.yaml")?;
    if k.api_version != "kustomize.config.k8s.io/v1beta1" || k.kind != "Kustomization" {
        bail!("kustomization.yaml: apiVersion {:?} kind {:?}", k.api_version, k.kind);
    }
    Ok(k)
}
