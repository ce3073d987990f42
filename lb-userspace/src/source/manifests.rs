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

/// Objects read from a directory, shared: the same `Arc` for an object of an unchanged file from
/// one read to the next, so that the model's cache (by object identity) skips it.
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

/// The documents of each file, kept while the file's (modification time, length) stays the same:
/// after a change to one file of a large directory only that file is parsed again, and the
/// objects of the others are the same `Arc`s as before.
#[derive(Default)]
pub struct DirCache {
    files: std::collections::HashMap<PathBuf, (FileStamp, SharedObjects)>,
}

/// (modification time, length); a file without a modification time is never taken from the cache.
type FileStamp = (Option<std::time::SystemTime>, u64);

impl DirCache {
    /// Reads `dir` as [`read_dir`] does, parsing only files that are new or changed since the last
    /// call.
    pub fn read(&mut self, dir: &Path) -> Result<SharedObjects, ManifestError> {
        let mut objects = SharedObjects::default();
        let mut next = std::collections::HashMap::new();
        for file in manifest_files(dir)? {
            // The stamp is taken before the text is read: a write in between leaves a stamp that
            // differs from the file's next one, so the file is read again then.
            let md = std::fs::metadata(&file).ok();
            let stamp: FileStamp = (md.as_ref().and_then(|m| m.modified().ok()), md.map_or(0, |m| m.len()));
            let parsed = match self.files.remove(&file) {
                Some((old, parsed)) if old == stamp && stamp.0.is_some() => parsed,
                _ => {
                    let mut parsed = Objects::default();
                    read_file(&file, &mut parsed);
                    SharedObjects::from(parsed)
                }
            };
            objects.services.extend(parsed.services.iter().cloned());
            objects.slices.extend(parsed.slices.iter().cloned());
            objects.pods.extend(parsed.pods.iter().cloned());
            objects.errors.extend(parsed.errors.iter().cloned());
            objects.ignored += parsed.ignored;
            next.insert(file, (stamp, parsed));
        }
        self.files = next;
        Ok(objects)
    }
}

/// Reads the documents of one file's text into `objects`.
pub fn read_str(file: &Path, text: &str, objects: &mut Objects) {
    for (i, de) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let doc = i + 1;
        let err =
            |object: Option<String>, reason: String| DocError { file: file.to_owned(), doc, object, reason };
        let value = match serde_yaml::Value::deserialize(de) {
            Ok(serde_yaml::Value::Null) => continue, // empty document (e.g. a trailing `---`)
            Ok(v) => v,
            Err(e) => {
                objects.errors.push(err(None, format!("not valid YAML: {e}")));
                // The YAML stream cannot be resumed after a syntax error.
                break;
            }
        };
        add_value(value, &err, objects);
    }
}

fn add_value(
    value: serde_yaml::Value,
    err: &dyn Fn(Option<String>, String) -> DocError,
    objects: &mut Objects,
) {
    let kind = value.get("kind").and_then(|k| k.as_str()).unwrap_or("").to_owned();
    let api = value.get("apiVersion").and_then(|k| k.as_str()).unwrap_or("").to_owned();
    let meta = value.get("metadata");
    let name = meta.and_then(|m| m.get("name")).and_then(|n| n.as_str()).unwrap_or("<unnamed>");
    let namespace = meta.and_then(|m| m.get("namespace")).and_then(|n| n.as_str()).unwrap_or("default");
    let label = Some(format!("{kind} {namespace}/{name}"));
    match (api.as_str(), kind.as_str()) {
        ("v1", "List") => match value.get("items").and_then(|i| i.as_sequence()) {
            Some(items) => {
                for item in items.clone() {
                    add_value(item, err, objects);
                }
            }
            None => objects.errors.push(err(label, "List without items".into())),
        },
        ("v1", "Service") => match serde_yaml::from_value::<Service>(value) {
            Ok(s) => objects.services.push(s),
            Err(e) => objects.errors.push(err(label, format!("invalid Service: {e}"))),
        },
        ("discovery.k8s.io/v1", "EndpointSlice") => match serde_yaml::from_value::<EndpointSlice>(value) {
            Ok(s) => objects.slices.push(s),
            Err(e) => objects.errors.push(err(label, format!("invalid EndpointSlice: {e}"))),
        },
        ("v1", "Pod") => match serde_yaml::from_value::<Pod>(value) {
            Ok(p) => objects.pods.push(p),
            Err(e) => objects.errors.push(err(label, format!("invalid Pod: {e}"))),
        },
        ("v1", "Endpoints") => match serde_yaml::from_value::<Endpoints>(value) {
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

    fn svc(name: &str, port: u16) -> String {
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: t}}\nspec:\n  clusterIP: 198.18.0.1\n  ports: [{{port: {port}}}]\n"
        )
    }

    fn ports(o: &SharedObjects) -> Vec<(String, i32)> {
        let mut v: Vec<_> = o
            .services
            .iter()
            .map(|s| {
                let name = s.metadata.name.clone().unwrap_or_default();
                let port = s.spec.as_ref().and_then(|p| p.ports.as_ref()).map_or(0, |p| p[0].port);
                (name, port)
            })
            .collect();
        v.sort();
        v
    }

    #[test]
    fn cache_reads_changed_new_and_removed_files() {
        let dir = std::env::temp_dir().join(format!("xlb-dircache-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("a.yaml"), svc("a", 80)).unwrap();
        std::fs::write(dir.join("b.yaml"), svc("b", 81)).unwrap();
        let mut cache = DirCache::default();
        let first = cache.read(&dir).unwrap();
        assert_eq!(ports(&first), vec![("a".into(), 80), ("b".into(), 81)]);
        assert_eq!(ports(&first), ports(&read_dir(&dir).unwrap().into()));

        // A changed file (another length), a new one, a removed one, and one that is not valid.
        std::fs::write(dir.join("a.yaml"), svc("a", 8080)).unwrap();
        std::fs::remove_file(dir.join("b.yaml")).unwrap();
        std::fs::write(dir.join("c.json"), r#"{"apiVersion":"v1","kind":"Service","metadata":{"name":"c","namespace":"t"},"spec":{"ports":[{"port":82}]}}"#).unwrap();
        std::fs::write(dir.join("d.yaml"), "kind: [").unwrap();
        let second = cache.read(&dir).unwrap();
        assert_eq!(ports(&second), vec![("a".into(), 8080), ("c".into(), 82)]);
        assert_eq!(second.errors.len(), 1, "{:?}", second.errors);
        // Unchanged files come from the cache, and give what a fresh read gives.
        let third = cache.read(&dir).unwrap();
        assert_eq!(ports(&third), ports(&second));
        assert_eq!(third.errors, second.errors);
        // ... as the same objects, which the model's cache recognises.
        assert!(third.services.iter().zip(&second.services).all(|(a, b)| Arc::ptr_eq(a, b)));
        assert!(!Arc::ptr_eq(&second.services[0], &first.services[0]), "a.yaml changed");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
