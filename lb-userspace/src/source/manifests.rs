//! The standalone source: a directory of Kubernetes manifests (Services, EndpointSlices,
//! core/v1 Endpoints, and Pods for their hostPorts; YAML or JSON, several documents per file, `kind: List` included), read
//! into k8s-openapi objects. A document that cannot be
//! read is reported with its file, position and name, and every other document still loads.
use std::{
    fmt,
    path::{Path, PathBuf},
    sync::Arc,
};

use k8s_openapi::api::{
    core::v1::{Endpoints, Pod, Service},
    discovery::v1::EndpointSlice,
};
use serde::Deserialize as _;

use super::slim::{SlimService, SlimSlice};
use crate::model::incremental::{Change, Key};

#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("cannot read manifest directory {path}: {source}")]
    Dir { path: PathBuf, source: std::io::Error },
}

/// A document that was skipped, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DocError {
    pub file: PathBuf,
    /// 1-based position of the document in its file.
    pub doc: usize,
    /// `Kind namespace/name` when it could be read.
    pub object: Option<String>,
    pub reason: String,
}

impl fmt::Display for DocError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (document {})", self.file.display(), self.doc)?;
        if let Some(o) = &self.object {
            write!(f, " {o}")?;
        }
        write!(f, ": {}", self.reason)
    }
}

/// Everything read from a directory.
#[derive(Clone, Debug, Default)]
pub struct Objects {
    pub services: Vec<Service>,
    /// EndpointSlices, and the slices equivalent to each core/v1 Endpoints object (see
    /// [`crate::model::slices_from_endpoints`]).
    pub slices: Vec<EndpointSlice>,
    /// Pods, for their hostPorts.
    pub pods: Vec<Pod>,
    pub errors: Vec<DocError>,
    /// Documents of kinds xlb does not use (Deployments, ConfigMaps, ...), counted, not errors.
    pub ignored: usize,
    /// Which Services (and slices) are read: the others count as ignored.
    pub proxy: super::ProxyName,
}

/// Files read, in name order: `*.yaml`, `*.yml`, `*.json`; hidden files are skipped.
pub fn manifest_files(dir: &Path) -> Result<Vec<PathBuf>, ManifestError> {
    let rd = std::fs::read_dir(dir).map_err(|source| ManifestError::Dir { path: dir.to_owned(), source })?;
    let mut files: Vec<PathBuf> = rd
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| {
            let hidden = p.file_name().and_then(|n| n.to_str()).is_none_or(|n| n.starts_with('.'));
            let ext = p.extension().and_then(|e| e.to_str()).unwrap_or("");
            !hidden && p.is_file() && matches!(ext, "yaml" | "yml" | "json")
        })
        .collect();
    files.sort();
    Ok(files)
}

/// Reads every manifest in `dir`.
pub fn read_dir(dir: &Path) -> Result<Objects, ManifestError> {
    let mut objects = Objects::default();
    for file in manifest_files(dir)? {
        read_file(&file, &mut objects);
    }
    Ok(objects)
}

/// Reads the documents of one file into `objects`; a file that cannot be read is an error there.
fn read_file(file: &Path, objects: &mut Objects) {
    match std::fs::read_to_string(file) {
        Ok(text) => read_str(file, &text, objects),
        Err(e) => objects.errors.push(DocError {
            file: file.to_owned(),
            doc: 0,
            object: None,
            reason: e.to_string(),
        }),
    }
}

/// Objects read from a directory, shared (the level-triggered model takes them so).
#[derive(Clone, Debug, Default)]
pub struct SharedObjects {
    pub services: Vec<Arc<Service>>,
    pub slices: Vec<Arc<EndpointSlice>>,
    pub pods: Vec<Arc<Pod>>,
    pub errors: Vec<DocError>,
    pub ignored: usize,
}

impl From<Objects> for SharedObjects {
    fn from(o: Objects) -> Self {
        SharedObjects {
            services: o.services.into_iter().map(Arc::new).collect(),
            slices: o.slices.into_iter().map(Arc::new).collect(),
            pods: o.pods.into_iter().map(Arc::new).collect(),
            errors: o.errors,
            ignored: o.ignored,
        }
    }
}

/// What the agent keeps of each file while its (modification time, length) stays the same: the
/// names of its Services and EndpointSlices (the model holds what it needs of them), its pods
/// (few: this node's hostPorts) and its errors. After a change to one file of a large directory
/// only that file is parsed again.
#[derive(Default)]
pub struct DirCache {
    /// Which Services (and slices) are read; the others are left out as the files are read.
    proxy: super::ProxyName,
    files: std::collections::HashMap<PathBuf, (FileStamp, FileObjects)>,
    /// How many files hold each Service and EndpointSlice (by namespace/name): one is gone when
    /// the last file holding it no longer does.
    held: crate::HashMap<(bool, Key), u32>,
}

#[derive(Default)]
struct FileObjects {
    services: Vec<Key>,
    slices: Vec<Key>,
    pods: Vec<Arc<Pod>>,
    errors: Vec<DocError>,
}

/// (modification time, length); a file without a modification time is never taken from the cache.
type FileStamp = (Option<std::time::SystemTime>, u64);

/// What changed in a directory since it was last read: the objects of the files that are new,
/// changed or gone, as changes (the newest version, or `None`: no file holds it any more).
#[derive(Default)]
pub struct DirChanges {
    pub services: Vec<Change<Service>>,
    pub slices: Vec<Change<EndpointSlice>>,
    /// Every pod of the directory, when a file with pods changed (they are few).
    pub pods: Option<Vec<Arc<Pod>>>,
    /// The documents that cannot be read, in every file.
    pub errors: Vec<DocError>,
    /// Those of them in the files read now.
    pub new_errors: Vec<DocError>,
    /// Files parsed again (new or changed) and gone.
    pub files_read: usize,
    pub files_gone: usize,
}

/// Gives a manifest's object the identity of its content, as the API server gives one a uid and
/// a resourceVersion: the model then keeps what it needs of it (a Service packed, a slice's
/// endpoints) and not the object, as for objects from the API server.
fn identify<K: kube::Resource + serde::Serialize>(obj: &mut K) {
    let meta = obj.meta_mut();
    meta.uid = None;
    meta.resource_version = None;
    let text = serde_json::to_vec(&*obj).unwrap_or_default();
    let h = crate::reconcile::maglev::fnv1a(&text, 0xcbf2_9ce4_8422_2325);
    let h2 = crate::reconcile::maglev::fnv1a(&text, h ^ 0x9e37_79b9_7f4a_7c15);
    let meta = obj.meta_mut();
    // A UUID's form, so that it is held as numbers.
    meta.uid = Some(crate::model::incremental::uuid_text([h, h2]));
    // Decimal, without leading zeros, as the API server writes it (held as a number).
    meta.resource_version = Some((h >> 1).to_string());
}

impl DirCache {
    /// A cache that reads the Services `proxy` serves (and their slices).
    pub fn new(proxy: super::ProxyName) -> Self {
        Self { proxy, ..Default::default() }
    }

    /// Reads the files of `dir` that are new or changed since the last call, and says what
    /// changed: the cost of those files, not of the directory (but for a stat of each file).
    pub fn read_changes(&mut self, dir: &Path) -> Result<DirChanges, ManifestError> {
        let mut out = DirChanges::default();
        let mut pods_changed = false;
        let mut old_files = std::mem::take(&mut self.files);
        let mut gone: Vec<FileObjects> = Vec::new();
        for file in manifest_files(dir)? {
            // The stamp is taken before the text is read: a write in between leaves a stamp that
            // differs from the file's next one, so the file is read again then.
            let md = std::fs::metadata(&file).ok();
            let stamp: FileStamp = (md.as_ref().and_then(|m| m.modified().ok()), md.map_or(0, |m| m.len()));
            let kept = match old_files.remove(&file) {
                Some((old, kept)) if old == stamp && stamp.0.is_some() => kept,
                old => {
                    let mut parsed = Objects { proxy: self.proxy.clone(), ..Default::default() };
                    read_file(&file, &mut parsed);
                    out.files_read += 1;
                    if let Some((_, old)) = old {
                        pods_changed |= !old.pods.is_empty();
                        gone.push(old);
                    }
                    pods_changed |= !parsed.pods.is_empty();
                    out.new_errors.extend(parsed.errors.iter().cloned());
                    // What the file holds now comes; what it held before goes below, unless a
                    // file (this one, changed, or another) still holds it.
                    let mut kept = FileObjects {
                        pods: parsed.pods.into_iter().map(Arc::new).collect(),
                        errors: parsed.errors,
                        ..Default::default()
                    };
                    for mut s in parsed.services {
                        let key = crate::model::ns_name(&s.metadata);
                        *self.held.entry((true, key.clone())).or_default() += 1;
                        identify(&mut s);
                        out.services.push((key.clone(), Some(Arc::new(s))));
                        kept.services.push(key);
                    }
                    for mut s in parsed.slices {
                        let key = crate::model::ns_name(&s.metadata);
                        *self.held.entry((false, key.clone())).or_default() += 1;
                        identify(&mut s);
                        out.slices.push((key.clone(), Some(Arc::new(s))));
                        kept.slices.push(key);
                    }
                    kept
                }
            };
            self.files.insert(file, (stamp, kept));
        }
        for (_, (_, old)) in old_files {
            out.files_gone += 1;
            pods_changed |= !old.pods.is_empty();
            gone.push(old);
        }
        for old in gone {
            for key in old.services {
                if self.release(true, &key) {
                    out.services.push((key, None));
                }
            }
            for key in old.slices {
                if self.release(false, &key) {
                    out.slices.push((key, None));
                }
            }
        }
        let mut files: Vec<&PathBuf> = self.files.keys().collect();
        files.sort();
        for f in &files {
            out.errors.extend(self.files[*f].1.errors.iter().cloned());
        }
        if pods_changed {
            out.pods = Some(files.iter().flat_map(|f| self.files[*f].1.pods.iter().cloned()).collect());
        }
        Ok(out)
    }

    /// One file fewer holds the object; true when none does any more.
    fn release(&mut self, service: bool, key: &Key) -> bool {
        let key = (service, key.clone());
        match self.held.get_mut(&key) {
            Some(n) if *n > 1 => {
                *n -= 1;
                false
            }
            _ => {
                self.held.remove(&key);
                true
            }
        }
    }
}

/// Reads the documents of one file's text into `objects`. JSON (a text that starts with `{`:
/// one or more JSON documents) is read by a JSON parser, many times faster than the YAML one on
/// the large Lists a generated directory holds; anything else as YAML (of which JSON is a part).
pub fn read_str(file: &Path, text: &str, objects: &mut Objects) {
    let err = |doc: usize| {
        move |object: Option<String>, reason: String| DocError { file: file.to_owned(), doc, object, reason }
    };
    if text.trim_start().starts_with('{') {
        let docs = serde_json::Deserializer::from_str(text).into_iter::<&serde_json::value::RawValue>();
        for (i, value) in docs.enumerate() {
            match value {
                Ok(v) => add_value(v, &err(i + 1), objects),
                Err(e) => {
                    objects.errors.push(err(i + 1)(None, format!("not valid JSON: {e}")));
                    break; // the stream cannot be resumed after a syntax error
                }
            }
        }
        return;
    }
    // Each document parsed on its own, so that a syntax error costs that document only (a YAML
    // stream cannot be resumed after one: the documents after it were lost, found by fuzzing).
    let docs = yaml_documents(text).into_iter().filter(|d| !d.trim().is_empty());
    for (i, doc) in docs.enumerate() {
        for de in serde_yaml::Deserializer::from_str(doc) {
            let value = match serde_yaml::Value::deserialize(de) {
                Ok(serde_yaml::Value::Null) => continue, // empty document (comments only)
                Ok(v) => v,
                Err(e) => {
                    objects.errors.push(err(i + 1)(None, format!("not valid YAML: {e}")));
                    break;
                }
            };
            add_value(value, &err(i + 1), objects);
        }
    }
}

/// The documents of a YAML stream, split where Kubernetes' YAML reader splits them: at lines
/// that start with `---` followed by nothing but spaces or a comment. A line that goes on
/// after its `---` (`--- {a: 1}`) starts a document with the rest of it.
fn yaml_documents(text: &str) -> Vec<&str> {
    let mut docs = Vec::new();
    let mut start = 0;
    let mut at = 0;
    for line in text.split_inclusive('\n') {
        if let Some(rest) = line.strip_prefix("---") {
            let rest = rest.trim();
            docs.push(&text[start..at]);
            start = if rest.is_empty() || rest.starts_with('#') { at + line.len() } else { at + 3 };
        }
        at += line.len();
    }
    docs.push(&text[start..]);
    docs
}

/// What a document says it is.
#[derive(Default, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct Head {
    api_version: Option<String>,
    kind: Option<String>,
    metadata: Option<HeadMeta>,
}

#[derive(Default, serde::Deserialize)]
struct HeadMeta {
    name: Option<String>,
    namespace: Option<String>,
    labels: Option<std::collections::BTreeMap<String, String>>,
}

/// A document as parsed: YAML into a value, JSON as its text (read once more into the type its
/// kind names, with no value tree in between: a directory of 100,000 Services in JSON Lists is
/// read as fast as the API server's lists).
trait Document: Sized {
    fn head(&self) -> Head;
    /// The items of a List.
    fn items(self) -> Option<Vec<Self>>;
    fn decode<T: serde::de::DeserializeOwned>(self) -> Result<T, String>;
}

impl Document for serde_yaml::Value {
    fn head(&self) -> Head {
        let text = |v: Option<&Self>| v.and_then(Self::as_str).map(str::to_owned);
        let meta = self.get("metadata");
        Head {
            api_version: text(self.get("apiVersion")),
            kind: text(self.get("kind")),
            metadata: Some(HeadMeta {
                name: text(meta.and_then(|m| m.get("name"))),
                namespace: text(meta.and_then(|m| m.get("namespace"))),
                labels: meta
                    .and_then(|m| m.get("labels"))
                    .and_then(|l| serde_yaml::from_value(l.clone()).ok()),
            }),
        }
    }
    fn items(mut self) -> Option<Vec<Self>> {
        match self.as_mapping_mut()?.remove("items")? {
            serde_yaml::Value::Sequence(items) => Some(items),
            _ => None,
        }
    }
    fn decode<T: serde::de::DeserializeOwned>(self) -> Result<T, String> {
        serde_yaml::from_value(self).map_err(|e| e.to_string())
    }
}

impl<'a> Document for &'a serde_json::value::RawValue {
    fn head(&self) -> Head {
        serde_json::from_str(self.get()).unwrap_or_else(|_| {
            // A field of another type than the API's somewhere (metadata a string, a number for
            // a kind): read as a value, what is text of these fields still names the document.
            serde_json::from_str::<serde_yaml::Value>(self.get()).map(|v| v.head()).unwrap_or_default()
        })
    }
    fn items(self) -> Option<Vec<Self>> {
        #[derive(serde::Deserialize)]
        struct Items<'a> {
            #[serde(borrow)]
            items: Option<Vec<&'a serde_json::value::RawValue>>,
        }
        serde_json::from_str::<Items<'a>>(self.get()).ok()?.items
    }
    fn decode<T: serde::de::DeserializeOwned>(self) -> Result<T, String> {
        serde_json::from_str(self.get()).map_err(|e| e.to_string())
    }
}

fn add_value<D: Document>(value: D, err: &dyn Fn(Option<String>, String) -> DocError, objects: &mut Objects) {
    let head = value.head();
    let kind = head.kind.unwrap_or_default();
    let api = head.api_version.unwrap_or_default();
    let meta = head.metadata.unwrap_or_default();
    let name = meta.name.as_deref().unwrap_or("<unnamed>");
    let namespace = meta.namespace.as_deref().unwrap_or("default");
    let label = Some(format!("{kind} {namespace}/{name}"));
    let labels = meta.labels.as_ref();
    match (api.as_str(), kind.as_str()) {
        // Another proxy's (service.kubernetes.io/service-proxy-name), or a headless Service's
        // slices: left out as the API server's label selectors leave them out.
        ("v1", "Service") if !objects.proxy.serves_service(labels) => objects.ignored += 1,
        ("discovery.k8s.io/v1", "EndpointSlice") | ("v1", "Endpoints")
            if !objects.proxy.reads_slice(labels) =>
        {
            objects.ignored += 1
        }
        ("v1", "List") => match value.items() {
            Some(items) => {
                for item in items {
                    add_value(item, err, objects);
                }
            }
            None => objects.errors.push(err(label, "List without items".into())),
        },
        // Read slim, as from the API server: what the model never reads is skipped.
        ("v1", "Service") => match value.decode::<SlimService>() {
            Ok(s) => objects.services.push(s.0),
            Err(e) => objects.errors.push(err(label, format!("invalid Service: {e}"))),
        },
        ("discovery.k8s.io/v1", "EndpointSlice") => match value.decode::<SlimSlice>() {
            Ok(s) => objects.slices.push(s.0),
            Err(e) => objects.errors.push(err(label, format!("invalid EndpointSlice: {e}"))),
        },
        ("v1", "Pod") => match value.decode::<Pod>() {
            Ok(p) => objects.pods.push(p),
            Err(e) => objects.errors.push(err(label, format!("invalid Pod: {e}"))),
        },
        ("v1", "Endpoints") => match value.decode::<Endpoints>() {
            Ok(e) => objects.slices.extend(crate::model::slices_from_endpoints(&e)),
            Err(e) => objects.errors.push(err(label, format!("invalid Endpoints: {e}"))),
        },
        (_, "") => objects.errors.push(err(None, "document has no kind".into())),
        (_, "Service" | "EndpointSlice" | "Endpoints" | "Pod") => {
            objects.errors.push(err(label, format!("unsupported apiVersion {api:?} for {kind}")))
        }
        _ => objects.ignored += 1,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_documents_and_lists_read_as_yaml_ones() {
        let svc = serde_json::json!({"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "web", "namespace": "shop", "annotations": {"a": "b"}},
            "spec": {"clusterIP": "198.18.0.10", "selector": {"app": "web"}, "ports": [{"port": 80, "targetPort": "http"}]}});
        let slice = serde_json::json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": "web-1", "namespace": "shop", "labels": {"kubernetes.io/service-name": "web", "x": "y"}},
            "addressType": "IPv4",
            "endpoints": [{"addresses": ["198.18.1.1"], "nodeName": "n", "targetRef": {"kind": "Pod", "name": "p"}}],
            "ports": [{"name": "http", "port": 8080}]});
        let bad = serde_json::json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "bad"}, "spec": {"ports": 3}});
        let odd = serde_json::json!({"apiVersion": "v1", "kind": "Service", "metadata": "not a map"});
        let other = serde_json::json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c"}});
        let list = serde_json::json!({"apiVersion": "v1", "kind": "List", "items": [svc, slice, bad]});
        let docs = [list, other, odd, serde_json::json!({"no": "kind"}), serde_json::json!([1])];
        let yaml: Vec<String> = docs.iter().map(|d| serde_yaml::to_string(d).unwrap()).collect();
        let json: Vec<String> = docs.iter().map(ToString::to_string).collect();
        let (mut from_yaml, mut from_json) = (Objects::default(), Objects::default());
        read_str("m.yaml".as_ref(), &yaml.join("---\n"), &mut from_yaml);
        read_str("m.json".as_ref(), &(json.join("\n") + "\n{ not json"), &mut from_json);
        assert_eq!(from_json.services, from_yaml.services);
        assert_eq!(from_json.slices, from_yaml.slices);
        assert_eq!((from_json.services.len(), from_json.slices.len(), from_json.ignored), (1, 1, 1));
        // Read slim: what the model never reads is not kept.
        assert!(from_json.services[0].metadata.annotations.is_none());
        assert!(from_json.slices[0].endpoints[0].target_ref.is_none());
        let errors = |o: &Objects| -> Vec<(usize, Option<String>)> {
            o.errors.iter().map(|e| (e.doc, e.object.clone())).collect()
        };
        let want = vec![
            (1, Some("Service default/bad".to_string())),
            (3, Some("Service default/<unnamed>".to_string())),
            (4, None),
            (5, None),
        ];
        assert_eq!(errors(&from_yaml), want, "{:?}", from_yaml.errors);
        // The JSON stream also ends at the text that is not JSON, named as its sixth document.
        let mut want_json = want;
        want_json.push((6, None));
        assert_eq!(errors(&from_json), want_json, "{:?}", from_json.errors);
    }

    fn svc(name: &str, port: u16) -> String {
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: t}}\nspec:\n  clusterIP: 198.18.0.1\n  ports: [{{port: {port}}}]\n"
        )
    }

    /// service.kubernetes.io/service-proxy-name in manifests, as the watches' label selectors
    /// have it: YAML and JSON alike, Services and their slices (EndpointSlices and Endpoints),
    /// headless slices never; a file whose Service gains the label loses that Service.
    /// A document that is not YAML costs itself only: the documents after it are read (before,
    /// the stream stopped at it; found by the input fuzzer).
    #[test]
    fn a_broken_document_costs_only_itself() {
        let text = format!(
            "{}---\napiVersion: v1\nkind: Service\nmetadata: {{name: cut\n--- # a comment\n{}---\n\t\x01 [\n---\n{}",
            svc("a", 80),
            svc("b", 81),
            svc("c", 82)
        );
        let mut o = Objects::default();
        read_str("x.yaml".as_ref(), &text, &mut o);
        let names: Vec<_> = o.services.iter().filter_map(|s| s.metadata.name.clone()).collect();
        assert_eq!(names, ["a", "b", "c"]);
        assert_eq!(o.errors.iter().map(|e| e.doc).collect::<Vec<_>>(), [2, 4], "{:?}", o.errors);
        // A document that starts on its separator's line is read too.
        let mut o = Objects::default();
        read_str(
            "x.yaml".as_ref(),
            "--- {apiVersion: v1, kind: Service, metadata: {name: d}, spec: {clusterIP: 198.18.0.9, ports: [{port: 80}]}}\n",
            &mut o,
        );
        assert_eq!((o.services.len(), o.errors.len()), (1, 0), "{:?}", o.errors);
    }

    #[test]
    fn manifests_of_another_proxy_are_left_out_as_from_the_api_server() {
        let dir = std::env::temp_dir().join(format!("xlb-proxyname-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let labelled = |name: &str, value: &str| {
            format!(
                "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: t, labels: {{service.kubernetes.io/service-proxy-name: {value}}}}}\nspec:\n  clusterIP: 198.18.0.1\n  ports: [{{port: 80}}]\n"
            )
        };
        let slice = |name: &str, labels: &str| {
            format!(
                "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: {name}, namespace: t, labels: {{kubernetes.io/service-name: x{labels}}}}}\naddressType: IPv4\nendpoints: []\n"
            )
        };
        std::fs::write(dir.join("a.yaml"), svc("plain", 80)).unwrap();
        std::fs::write(dir.join("b.yaml"), labelled("other", "kp2")).unwrap();
        std::fs::write(
            dir.join("c.json"),
            r#"{"apiVersion": "v1", "kind": "List", "items": [{"apiVersion": "v1", "kind": "Service", "metadata": {"name": "mine", "namespace": "t", "labels": {"service.kubernetes.io/service-proxy-name": "xlb-b"}}, "spec": {"clusterIP": "198.18.0.2", "ports": [{"port": 80}]}}, {"apiVersion": "v1", "kind": "Endpoints", "metadata": {"name": "mine", "namespace": "t", "labels": {"service.kubernetes.io/service-proxy-name": "xlb-b"}}, "subsets": [{"addresses": [{"ip": "198.18.1.1"}], "ports": [{"port": 8080}]}]}]}"#,
        )
        .unwrap();
        std::fs::write(
            dir.join("d.yaml"),
            slice("s-plain", "")
                + "---\n"
                + &slice("s-kp2", ", service.kubernetes.io/service-proxy-name: kp2")
                + "---\n"
                + &slice("s-headless", ", service.kubernetes.io/headless: ''"),
        )
        .unwrap();
        let names = |c: &DirChanges| -> (Vec<String>, Vec<String>) {
            let mut s: Vec<_> =
                c.services.iter().filter(|(_, o)| o.is_some()).map(|(k, _)| k.1.to_string()).collect();
            let mut e: Vec<_> =
                c.slices.iter().filter(|(_, o)| o.is_some()).map(|(k, _)| k.1.to_string()).collect();
            s.sort();
            e.sort();
            (s, e)
        };
        let default = DirCache::new(super::super::ProxyName::default()).read_changes(&dir).unwrap();
        assert_eq!(names(&default), (vec!["plain".to_string()], vec!["s-plain".to_string()]));
        let named = super::super::ProxyName::new(Some("xlb-b".into())).unwrap();
        let mut cache = DirCache::new(named);
        let b = cache.read_changes(&dir).unwrap();
        // With a name, slices are read whatever their proxy label (hand-made ones need not have
        // it); those of Services not served are unused.
        assert_eq!(
            names(&b),
            (
                vec!["mine".to_string()],
                vec!["mine-endpoints-0".to_string(), "s-kp2".to_string(), "s-plain".to_string()]
            )
        );
        // "plain" gains the label xlb-b: it comes.
        std::fs::write(dir.join("a.yaml"), labelled("plain", "xlb-b")).unwrap();
        let later = cache.read_changes(&dir).unwrap();
        assert_eq!(names(&later).0, vec!["plain".to_string()]);
        // ... and loses it: it goes.
        std::fs::write(dir.join("a.yaml"), svc("plain", 81)).unwrap();
        let gone = cache.read_changes(&dir).unwrap();
        assert!(
            gone.services.iter().any(|(k, o)| &*k.1 == "plain" && o.is_none()),
            "{:?}",
            gone.services.len()
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// The changes of a read name the objects of the files that changed, and only those: the
    /// cost of a change is its file's, not the directory's.
    #[test]
    fn a_changed_file_yields_the_changes_of_its_objects_only() {
        let dir = std::env::temp_dir().join(format!("xlb-dirchanges-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        for i in 0..50 {
            std::fs::write(dir.join(format!("f{i:02}.yaml")), svc(&format!("s{i}"), 80)).unwrap();
        }
        let names = |c: &DirChanges| -> Vec<(String, bool)> {
            let mut v: Vec<_> = c.services.iter().map(|(k, o)| (k.1.to_string(), o.is_some())).collect();
            v.sort();
            v
        };
        let mut cache = DirCache::default();
        let first = cache.read_changes(&dir).unwrap();
        assert_eq!(first.services.len(), 50);
        assert_eq!(first.files_read, 50);
        // Nothing changed: nothing read, no change.
        let none = cache.read_changes(&dir).unwrap();
        assert_eq!((none.files_read, none.services.len()), (0, 0));
        // One file changed: its object alone, in its new version.
        std::fs::write(dir.join("f07.yaml"), svc("s7", 8080)).unwrap();
        let one = cache.read_changes(&dir).unwrap();
        assert_eq!(one.files_read, 1);
        assert_eq!(names(&one), vec![("s7".into(), true)]);
        // Each object comes with the identity of its content (uid and resourceVersion as the API
        // server writes them), so that the model keeps what it needs of it, not the object.
        let identity = |c: &DirChanges, n: &str| {
            let o = c.services.iter().find(|(k, _)| &*k.1 == n).and_then(|(_, o)| o.clone()).unwrap();
            (o.metadata.uid.clone().unwrap(), o.metadata.resource_version.clone().unwrap())
        };
        let (uid, rv) = identity(&one, "s7");
        assert_eq!((uid.len(), uid.matches('-').count()), (36, 4), "{uid}");
        assert!(rv.parse::<u64>().is_ok_and(|n| n.to_string() == rv), "{rv}");
        assert_ne!((uid.clone(), rv.clone()), identity(&first, "s7"), "another content, another identity");
        std::fs::write(dir.join("f07.yaml"), svc("s7", 80)).unwrap();
        let back = cache.read_changes(&dir).unwrap();
        assert_eq!(identity(&back, "s7"), identity(&first, "s7"), "the same content, the same identity");
        // An object moved to another file: still there; a file removed: its object gone; a bad
        // document: its error is new, and stays among all the errors after.
        std::fs::remove_file(dir.join("f08.yaml")).unwrap();
        std::fs::write(dir.join("f09.yaml"), svc("s9", 80) + "---\n" + &svc("s8", 80)).unwrap();
        std::fs::remove_file(dir.join("f10.yaml")).unwrap();
        std::fs::write(dir.join("zz.yaml"), "kind: [").unwrap();
        let moved = cache.read_changes(&dir).unwrap();
        assert_eq!(
            names(&moved).iter().filter(|(n, _)| n == "s10").collect::<Vec<_>>(),
            [&("s10".to_string(), false)]
        );
        let last = |n: &str| moved.services.iter().rev().find(|(k, _)| &*k.1 == n).map(|(_, o)| o.is_some());
        assert_eq!(last("s8"), Some(true), "moved, not gone: {:?}", names(&moved));
        assert_eq!((moved.new_errors.len(), moved.errors.len()), (1, 1));
        let after = cache.read_changes(&dir).unwrap();
        assert_eq!((after.new_errors.len(), after.errors.len(), after.services.len()), (0, 1, 0));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
