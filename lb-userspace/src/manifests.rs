//! The standalone source: a directory of Kubernetes manifests (Services, EndpointSlices,
//! core/v1 Endpoints, and Pods for their hostPorts; YAML or JSON, several documents per file, `kind: List` included), read
//! into k8s-openapi objects. A document that cannot be
//! read is reported with its file, position and name, and every other document still loads.
use std::{
    fmt,
    path::{Path, PathBuf},
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
        match std::fs::read_to_string(&file) {
            Ok(text) => read_str(&file, &text, &mut objects),
            Err(e) => objects.errors.push(DocError { file, doc: 0, object: None, reason: e.to_string() }),
        }
    }
    Ok(objects)
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
