//! What the CLI shows: the datapath's service maps joined to backends and names, the way
//! `kubectl get svc` shows Services.
use std::{collections::BTreeMap, net::Ipv4Addr};

use lb_common::{BACKEND_STATE_ACTIVE, BACKEND_STATE_TERMINATING};
use serde::Serialize;

use crate::{
    datapath::{Datapath, DatapathError},
    model::{Proto, SvcType},
    reconcile::unfixed,
};

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct BackendRow {
    pub address: String,
    pub port: u16,
    pub state: &'static str,
    pub id: u32,
    /// New flows may choose this backend.
    pub selectable: bool,
}

/// One frontend: the stable JSON schema of `xlb services -o json` (an array of these).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ServiceRow {
    pub namespace: String,
    pub name: String,
    #[serde(rename = "type")]
    pub svc_type: Option<SvcType>,
    pub port_name: String,
    pub frontend: String,
    pub address: String,
    pub port: u16,
    pub protocol: String,
    pub service_id: u32,
    pub backends: Vec<BackendRow>,
}

fn state_name(s: u8) -> &'static str {
    match s {
        BACKEND_STATE_ACTIVE => "active",
        BACKEND_STATE_TERMINATING => "terminating",
        _ => "free",
    }
}

/// Reads every frontend with its backends, sorted by namespace, name and frontend.
pub fn service_rows(dp: &impl Datapath) -> Result<Vec<ServiceRow>, DatapathError> {
    let infos: BTreeMap<u32, _> = dp.read_svc_infos()?.into_iter().collect();
    let mut entries = BTreeMap::new();
    let mut slots: BTreeMap<([u8; 4], u16, u8), BTreeMap<u16, u32>> = BTreeMap::new();
    for (k, v) in dp.read_services()? {
        let fk = (k.addr, k.port, k.proto);
        if k.slot == 0 {
            entries.insert(fk, v);
        } else {
            slots.entry(fk).or_default().insert(k.slot, v.backend_id);
        }
    }
    let mut rows = Vec::new();
    for ((addr, port, proto), v) in entries {
        let info = infos.get(&v.svc_id);
        let fk = (addr, port, proto);
        let addr = Ipv4Addr::from(addr);
        let protocol = Proto::from_number(proto).map_or_else(|| proto.to_string(), |p| p.to_string());
        let mut backends = Vec::new();
        let s = slots.get(&fk);
        // Slots 1..=count take new flows; later slots hold terminating backends.
        for (&slot, &id) in s.into_iter().flatten() {
            let b = dp.read_backend(id)?;
            backends.push(BackendRow {
                address: Ipv4Addr::from(b.addr).to_string(),
                port: b.port,
                state: state_name(b.state),
                id,
                selectable: slot <= v.count,
            });
        }
        rows.push(ServiceRow {
            namespace: info.map(|i| unfixed(&i.namespace)).unwrap_or_default(),
            name: info.map(|i| unfixed(&i.name)).unwrap_or_default(),
            svc_type: info.and_then(|i| SvcType::from_code(i.svc_type)),
            port_name: info.map(|i| unfixed(&i.port_name)).unwrap_or_default(),
            frontend: format!("{addr}:{port}/{protocol}"),
            address: addr.to_string(),
            port,
            protocol,
            service_id: v.svc_id,
            backends,
        });
    }
    rows.sort_by(|a, b| (&a.namespace, &a.name, &a.frontend).cmp(&(&b.namespace, &b.name, &b.frontend)));
    Ok(rows)
}

/// Renders rows as an aligned table.
pub fn services_table(rows: &[ServiceRow]) -> String {
    let mut table = vec![["NAMESPACE", "NAME", "TYPE", "FRONTEND", "BACKENDS"].map(String::from).to_vec()];
    for r in rows {
        let backends = if r.backends.is_empty() {
            "<none>".to_string()
        } else {
            r.backends
                .iter()
                .map(|b| {
                    let mut s = format!("{}:{}", b.address, b.port);
                    if b.state != "active" {
                        s.push_str(&format!(" ({})", b.state));
                    }
                    s
                })
                .collect::<Vec<_>>()
                .join(",")
        };
        let ty = r.svc_type.map_or("?".into(), |t| format!("{t:?}"));
        let name =
            if r.port_name.is_empty() { r.name.clone() } else { format!("{}:{}", r.name, r.port_name) };
        table.push(vec![r.namespace.clone(), name, ty, r.frontend.clone(), backends]);
    }
    let widths: Vec<usize> =
        (0..5).map(|c| table.iter().map(|row| row[c].len()).max().unwrap_or(0)).collect();
    let mut out = String::new();
    for row in table {
        let line: Vec<String> =
            row.iter().enumerate().map(|(i, cell)| format!("{cell:<w$}", w = widths[i])).collect();
        out.push_str(line.join("   ").trim_end());
        out.push('\n');
    }
    out
}
