//! Authentication and RBAC authorization as the API server does them, for the fake API server:
//! a bearer token names a user (a service account here), a request's path, method and query
//! give its attributes (verb, API group, resource, subresource, namespace, name, or a
//! non-resource URL), and ClusterRoleBindings whose subjects match the user grant the rules of
//! their ClusterRoles. Only what a DaemonSet's agent can be given is modelled: ClusterRoles and
//! ClusterRoleBindings (no namespaced Roles, aggregation or impersonation).
use std::collections::BTreeMap;

use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, PolicyRule};

/// Who a token authenticates as.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct User {
    pub name: String,
    pub groups: Vec<String>,
}

impl User {
    /// The user of service account `name` in `namespace`, with its groups.
    pub fn service_account(namespace: &str, name: &str) -> Self {
        User {
            name: format!("system:serviceaccount:{namespace}:{name}"),
            groups: vec![
                "system:serviceaccounts".into(),
                format!("system:serviceaccounts:{namespace}"),
                "system:authenticated".into(),
            ],
        }
    }
}

/// What a request asks for, as the API server's authorizer sees it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Attributes {
    pub verb: String,
    /// `None` for a non-resource request (then `path` is what is asked for).
    pub resource: Option<ResourceAttributes>,
    pub path: String,
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct ResourceAttributes {
    pub group: String,
    pub resource: String,
    pub subresource: String,
    pub namespace: String,
    pub name: String,
}

impl Attributes {
    /// The attributes of `method target` (target: path and query).
    pub fn of(method: &str, target: &str) -> Self {
        let (path, query) = target.split_once('?').unwrap_or((target, ""));
        let watch = query.split('&').any(|kv| kv == "watch=true" || kv == "watch=1");
        let parts: Vec<&str> = path.trim_matches('/').split('/').filter(|p| !p.is_empty()).collect();
        // /api/v1/... is the core group; /apis/GROUP/VERSION/... the others.
        let (group, rest): (&str, &[&str]) = match parts.as_slice() {
            ["api", _v, rest @ ..] if !rest.is_empty() => ("", rest),
            ["apis", g, _v, rest @ ..] if !rest.is_empty() => (g, rest),
            _ => return Self { verb: method.to_ascii_lowercase(), resource: None, path: path.to_owned() },
        };
        let (namespace, rest) = match rest {
            // "namespaces/NAME" alone is the namespace object itself.
            ["namespaces", ns, r @ ..] if !r.is_empty() => (*ns, r),
            r => ("", r),
        };
        let (resource, name, subresource) = match rest {
            [r] => (*r, "", ""),
            [r, n] => (*r, *n, ""),
            [r, n, s, ..] => (*r, *n, *s),
            [] => unreachable!("rest is not empty"),
        };
        let verb = match (method, name.is_empty()) {
            ("GET" | "HEAD", true) if watch => "watch",
            ("GET" | "HEAD", true) => "list",
            ("GET" | "HEAD", false) if watch => "watch",
            ("GET" | "HEAD", false) => "get",
            ("POST", _) => "create",
            ("PUT", _) => "update",
            ("PATCH", _) => "patch",
            ("DELETE", true) => "deletecollection",
            ("DELETE", false) => "delete",
            (m, _) => return Self { verb: m.to_ascii_lowercase(), resource: None, path: path.to_owned() },
        };
        Self {
            verb: verb.into(),
            resource: Some(ResourceAttributes {
                group: group.into(),
                resource: resource.into(),
                subresource: subresource.into(),
                namespace: namespace.into(),
                name: name.into(),
            }),
            path: path.to_owned(),
        }
    }

    /// `verb group/resource` (`list /services`, `watch discovery.k8s.io/endpointslices`), or
    /// `verb path` for a non-resource URL.
    pub fn short(&self) -> String {
        match &self.resource {
            Some(r) if r.subresource.is_empty() => format!("{} {}/{}", self.verb, r.group, r.resource),
            Some(r) => format!("{} {}/{}/{}", self.verb, r.group, r.resource, r.subresource),
            None => format!("{} {}", self.verb, self.path),
        }
    }
}

fn has(list: &Option<Vec<String>>, want: &str) -> bool {
    list.iter().flatten().any(|v| v == "*" || v == want)
}

/// Whether `rule` allows `a` (RBAC's rule matching).
pub fn rule_allows(rule: &PolicyRule, a: &Attributes) -> bool {
    if !rule.verbs.iter().any(|v| v == "*" || *v == a.verb) {
        return false;
    }
    match &a.resource {
        Some(r) => {
            let res = if r.subresource.is_empty() {
                r.resource.clone()
            } else {
                format!("{}/{}", r.resource, r.subresource)
            };
            has(&rule.api_groups, &r.group)
                && has(&rule.resources, &res)
                && (rule.resource_names.as_ref().is_none_or(|n| n.is_empty())
                    || has(&rule.resource_names, &r.name))
        }
        None => {
            rule.non_resource_urls.iter().flatten().any(|u| {
                u == "*" || *u == a.path || u.strip_suffix('*').is_some_and(|p| a.path.starts_with(p))
            })
        }
    }
}

/// The cluster's RBAC objects and its tokens.
#[derive(Clone, Debug, Default)]
pub struct Rbac {
    pub tokens: BTreeMap<String, User>,
    pub roles: Vec<ClusterRole>,
    pub bindings: Vec<ClusterRoleBinding>,
}

/// What the authorizer said of one request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// No token, or one nobody has: 401.
    Unauthenticated,
    Denied(User),
    Allowed(User),
}

impl Rbac {
    /// The rules bound to `user`.
    pub fn rules_of(&self, user: &User) -> Vec<&PolicyRule> {
        let mut out = Vec::new();
        for b in &self.bindings {
            let bound = b.subjects.iter().flatten().any(|s| match s.kind.as_str() {
                "ServiceAccount" => {
                    user.name
                        == format!(
                            "system:serviceaccount:{}:{}",
                            s.namespace.as_deref().unwrap_or(""),
                            s.name
                        )
                }
                "User" => user.name == s.name,
                "Group" => user.groups.contains(&s.name),
                _ => false,
            });
            if !bound || b.role_ref.kind != "ClusterRole" {
                continue;
            }
            let role =
                self.roles.iter().find(|r| r.metadata.name.as_deref() == Some(b.role_ref.name.as_str()));
            out.extend(role.into_iter().flat_map(|r| r.rules.iter().flatten()));
        }
        out
    }

    /// Authenticates `authorization` (the header's value) and authorizes `a`.
    pub fn decide(&self, authorization: Option<&str>, a: &Attributes) -> Decision {
        let token = authorization.and_then(|h| h.strip_prefix("Bearer ")).map(str::trim);
        let Some(user) = token.and_then(|t| self.tokens.get(t)) else { return Decision::Unauthenticated };
        if self.rules_of(user).iter().any(|r| rule_allows(r, a)) {
            Decision::Allowed(user.clone())
        } else {
            Decision::Denied(user.clone())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(groups: &[&str], resources: &[&str], verbs: &[&str]) -> PolicyRule {
        let v = |s: &[&str]| Some(s.iter().map(|x| x.to_string()).collect());
        PolicyRule {
            api_groups: v(groups),
            resources: v(resources),
            verbs: v(verbs).unwrap(),
            ..Default::default()
        }
    }

    #[test]
    fn request_attributes_are_the_api_servers() {
        let a = Attributes::of("GET", "/api/v1/services?resourceVersion=0");
        assert_eq!(a.short(), "list /services");
        let a =
            Attributes::of("GET", "/apis/discovery.k8s.io/v1/endpointslices?watch=true&resourceVersion=5");
        assert_eq!(a.short(), "watch discovery.k8s.io/endpointslices");
        let a = Attributes::of("GET", "/api/v1/namespaces/kube-system/pods/p1/log");
        let r = a.resource.clone().unwrap();
        assert_eq!(
            (a.verb.as_str(), r.namespace.as_str(), r.name.as_str(), r.subresource.as_str()),
            ("get", "kube-system", "p1", "log")
        );
        assert_eq!(
            Attributes::of("POST", "/apis/events.k8s.io/v1/namespaces/d/events").short(),
            "create events.k8s.io/events"
        );
        assert_eq!(Attributes::of("GET", "/api/v1/namespaces/d").short(), "get /namespaces");
        assert_eq!(Attributes::of("GET", "/version").short(), "get /version");
    }

    #[test]
    fn rules_match_as_rbac_does() {
        let list_svc = Attributes::of("GET", "/api/v1/services");
        assert!(rule_allows(&rule(&[""], &["services"], &["list"]), &list_svc));
        assert!(rule_allows(&rule(&["*"], &["*"], &["*"]), &list_svc));
        assert!(!rule_allows(&rule(&["apps"], &["services"], &["list"]), &list_svc), "other group");
        assert!(!rule_allows(&rule(&[""], &["services"], &["get"]), &list_svc), "other verb");
        assert!(!rule_allows(&rule(&[""], &["pods"], &["list"]), &list_svc), "other resource");
        let log = Attributes::of("GET", "/api/v1/namespaces/d/pods/p/log");
        assert!(!rule_allows(&rule(&[""], &["pods"], &["get"]), &log), "a subresource is its own");
        assert!(rule_allows(&rule(&[""], &["pods/log"], &["get"]), &log));
        let mut named = rule(&[""], &["pods"], &["get"]);
        named.resource_names = Some(vec!["q".into()]);
        assert!(!rule_allows(&named, &Attributes::of("GET", "/api/v1/namespaces/d/pods/p")));
        assert!(rule_allows(&named, &Attributes::of("GET", "/api/v1/namespaces/d/pods/q")));
    }

    #[test]
    fn bindings_grant_to_their_subjects_only() {
        use k8s_openapi::api::rbac::v1::{RoleRef, Subject};
        let sa = User::service_account("xlb-system", "xlb");
        let other = User::service_account("default", "xlb");
        let mut rbac = Rbac::default();
        rbac.tokens.insert("t1".into(), sa.clone());
        rbac.tokens.insert("t2".into(), other);
        let role = ClusterRole {
            metadata: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
                name: Some("r".into()),
                ..Default::default()
            },
            rules: Some(vec![rule(&[""], &["services"], &["list"])]),
            ..Default::default()
        };
        rbac.roles.push(role);
        let b = ClusterRoleBinding {
            role_ref: RoleRef {
                api_group: "rbac.authorization.k8s.io".into(),
                kind: "ClusterRole".into(),
                name: "r".into(),
            },
            subjects: Some(vec![Subject {
                kind: "ServiceAccount".into(),
                name: "xlb".into(),
                namespace: Some("xlb-system".into()),
                ..Default::default()
            }]),
            ..Default::default()
        };
        rbac.bindings.push(b);
        let a = Attributes::of("GET", "/api/v1/services");
        assert_eq!(rbac.decide(Some("Bearer t1"), &a), Decision::Allowed(sa));
        assert!(
            matches!(rbac.decide(Some("Bearer t2"), &a), Decision::Denied(_)),
            "same name, other namespace"
        );
        assert_eq!(rbac.decide(Some("Bearer nope"), &a), Decision::Unauthenticated);
        assert_eq!(rbac.decide(None, &a), Decision::Unauthenticated);
    }
}
