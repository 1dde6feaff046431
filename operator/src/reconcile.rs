//! Reconciling one Site: render its objects, apply those that changed, and record what was
//! deployed in the status of the Site, its Devices and its Formulas.

use std::{sync::Arc, time::Duration};

use k8s_openapi::{
    api::{apps::v1::StatefulSet, core::v1::ConfigMap, core::v1::Service},
    jiff::Timestamp,
};
use kube::{
    Api, Resource, ResourceExt,
    api::{DeleteParams, Patch, PatchParams},
    runtime::{controller::Action, events::EventType, reflector::ObjectRef},
};
use serde::{Serialize, de::DeserializeOwned};
use serde_json::json;
use tagstream_core::calc::FormulaError;
use tagstream_crds::{Formula, Site, condition_types::VALID, site_files::TooLarge};

use crate::{
    apply::{Outcome, apply_if_changed, apply_or_recreate},
    context::Context,
    metrics::WriteLabels,
    render::{config_map_name, render},
    status::{FieldManager, device_deployed, formula_deployed, site_deployed, turns_false},
};

/// A reconcile is repeated this often even without a change, so that a rendered object
/// deleted or edited behind the operator's back is put back.
pub const RESYNC: Duration = Duration::from_secs(300);
/// First retry after a failed reconcile; doubles per failure up to [`RESYNC`].
pub const RETRY: Duration = Duration::from_secs(5);

/// Why a reconcile failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Site {0} has no namespace")]
    NoNamespace(String),
    #[error("cannot apply {kind} {namespace}/{name}: {source}")]
    Apply {
        kind: String,
        namespace: String,
        name: String,
        #[source]
        source: kube::Error,
    },
    /// Applying would fail with the API server's "Too long" and leave the ingestor on its
    /// last configuration anyway: nothing is applied, and the reason names the site.
    #[error(transparent)]
    TooLarge(#[from] TooLarge),
    #[error("cannot write the status of {kind} {namespace}/{name}: {source}")]
    Status {
        kind: String,
        namespace: String,
        name: String,
        #[source]
        source: kube::Error,
    },
}

/// Renders `site` and brings the cluster in line with it.
pub async fn reconcile(site: Arc<Site>, ctx: Arc<Context>) -> Result<Action, Error> {
    let started = std::time::Instant::now();
    ctx.metrics.reconciles.inc();
    let result = Box::pin(reconcile_site(&site, &ctx)).await;
    ctx.metrics.reconcile_seconds.observe(started.elapsed().as_secs_f64());
    if let Err(error) = &result {
        // A site that fails to apply has had its turn: it must not hold back the status
        // writes of the others until it succeeds.
        ctx.statuses_now(&site);
        // Where a user looks first (`kubectl describe site`); kube's recorder folds the
        // repeats of a retried failure into one event with a count.
        ctx.event(&*site, EventType::Warning, "ReconcileFailed", error.to_string())
            .await;
    }
    if result.is_ok() {
        ctx.failures
            .lock()
            .expect("failures lock")
            .remove(&ObjectRef::from(&*site));
    }
    result
}

/// Retries a failed reconcile with a backoff per site: 5 s, 10 s, 20 s ... up to 5 min.
#[allow(
    clippy::needless_pass_by_value,
    reason = "the signature kube-runtime's Controller::run asks for"
)]
pub fn error_policy(site: Arc<Site>, error: &Error, ctx: Arc<Context>) -> Action {
    ctx.metrics.reconcile_errors.inc();
    let failures = {
        let mut failures = ctx.failures.lock().expect("failures lock");
        let count = failures.entry(ObjectRef::from(&*site)).or_default();
        *count = count.saturating_add(1);
        *count
    };
    let delay = RETRY.saturating_mul(1 << failures.min(6).saturating_sub(1)).min(RESYNC);
    tracing::warn!(site = %site.name_any(), %error, failures, retry_in = ?delay, "reconcile failed");
    Action::requeue(delay)
}

async fn reconcile_site(site: &Site, ctx: &Context) -> Result<Action, Error> {
    if site.meta().deletion_timestamp.is_some() {
        // The rendered objects are owned by the Site: the garbage collector removes them,
        // and the queue's volume claim, owned by nobody, stays.
        return Ok(Action::await_change());
    }
    let name = site.name_any();
    let namespace = site.namespace().ok_or_else(|| Error::NoNamespace(name.clone()))?;
    let (devices, formulas) = ctx.members(site);
    let rendered = render(site, &devices, &formulas, &ctx.settings)?;

    let mut written = Vec::new();
    let client = &ctx.client;
    let config_maps = Api::<ConfigMap>::namespaced(client.clone(), &namespace);
    let shards = rendered.config_maps.len();
    let mut applied = Vec::new();
    for config_map in rendered.config_maps {
        applied.push(apply(ctx, &config_maps, config_map).await?);
    }
    let stateful_set = Box::pin(apply(
        ctx,
        &Api::<StatefulSet>::namespaced(client.clone(), &namespace),
        rendered.stateful_set,
    ))
    .await?;
    if stateful_set.1 == Outcome::Written {
        // The pods mount the ConfigMaps just applied: those of a site that needed more
        // before are no longer read.
        delete_config_maps_from(&config_maps, &name, shards).await?;
    }
    applied.push(stateful_set);
    applied.push(
        apply(
            ctx,
            &Api::<Service>::namespaced(client.clone(), &namespace),
            rendered.service,
        )
        .await?,
    );
    let mut terminating = None;
    for (kind, outcome) in applied {
        match outcome {
            Outcome::Written => written.push(kind),
            Outcome::Terminating => terminating = Some(TERMINATING_RECHECK),
            Outcome::Unchanged => {}
        }
    }
    if !written.is_empty() {
        tracing::info!(%namespace, site = %name, written = ?written, "applied the site's ingestor");
        let note = format!("applied {}", written.join(", "));
        ctx.event(site, EventType::Normal, "Applied", note).await;
    }

    if !ctx.statuses_now(site) {
        return Ok(terminating.map_or_else(Action::await_change, Action::requeue));
    }

    let now = Timestamp::now();
    let mut report_due: Option<Duration> = None;
    for formula in formulas.iter().map(Arc::as_ref) {
        let issue = rendered.formula_issues.get(&formula.name_any());
        if let Some(wait) = issue.and_then(|issue| input_may_be_arriving(formula, issue, ctx.apply_window, now)) {
            report_due = Some(report_due.map_or(wait, |due| due.min(wait)));
            continue;
        }
        let order = rendered
            .dependency_order
            .get(&formula.name_any())
            .cloned()
            .unwrap_or_default();
        if let Some(deployed) = formula_deployed(formula, issue, &order, now) {
            write_status(ctx, formula, FieldManager::Reconcile, &deployed).await?;
            let before = formula
                .status
                .as_ref()
                .map(|s| s.conditions.as_slice())
                .unwrap_or_default();
            if let Some(issue) = issue.filter(|_| turns_false(before, &deployed.conditions, VALID)) {
                ctx.event(
                    formula,
                    EventType::Warning,
                    issue.reason(),
                    format!("left out of site {name}: {issue}"),
                )
                .await;
            }
        }
    }
    for device in devices.iter().map(Arc::as_ref) {
        if let Some(deployed) = device_deployed(device) {
            write_status(ctx, device, FieldManager::Reconcile, &deployed).await?;
        }
    }
    let valid_formulas = formulas.len() - rendered.formula_issues.len();
    if let Some(deployed) = site_deployed(
        site,
        devices.len() as u32,
        valid_formulas as u32,
        rendered.config_bytes as u64,
    ) {
        write_status(ctx, site, FieldManager::Reconcile, &deployed).await?;
    }
    // A held-back report is due when the apply window closes, and a terminating object
    // may be gone soon: look again then.
    let soonest = [report_due.map(|due| due + REPORT_MARGIN), terminating];
    Ok(Action::requeue(
        soonest.into_iter().flatten().fold(RESYNC, Duration::min),
    ))
}

/// Deletes the site's ConfigMaps from the `first`th on, until one is not there.
async fn delete_config_maps_from(api: &Api<ConfigMap>, site: &str, first: usize) -> Result<(), Error> {
    for index in first.. {
        let name = config_map_name(site, index);
        match api.delete(&name, &DeleteParams::default()).await {
            Ok(_) => tracing::info!(site, config_map = name, "deleted a ConfigMap the site no longer needs"),
            Err(kube::Error::Api(status)) if status.code == 404 => return Ok(()),
            Err(source) => {
                return Err(Error::Apply {
                    kind: "ConfigMap".into(),
                    namespace: api.namespace().unwrap_or_default().to_owned(),
                    name,
                    source,
                });
            }
        }
    }
    Ok(())
}

/// How soon a reconcile that found a rendered object terminating looks again (its
/// deletion, once the garbage collector is done, also triggers one).
const TERMINATING_RECHECK: Duration = Duration::from_secs(2);

/// Past the end of an apply window, so that the creation timestamp's one-second
/// resolution cannot make the next look fall just short of it.
const REPORT_MARGIN: Duration = Duration::from_secs(1);

/// `kubectl apply -f dir/` may send a Formula before the Formula or Device it reads. An
/// input that names nothing (or a formula left out for that reason) is therefore not
/// reported on a Formula created less than `window` ago: this returns how long until it
/// is, and `None` when the issue is to be reported now. The formula stays out of the
/// rendered configuration either way.
fn input_may_be_arriving(
    formula: &Formula,
    issue: &FormulaError,
    window: Duration,
    now: Timestamp,
) -> Option<Duration> {
    if !matches!(
        issue,
        FormulaError::UnknownInput { .. } | FormulaError::InvalidInput { .. }
    ) {
        return None;
    }
    let created = formula.metadata.creation_timestamp.as_ref()?.0;
    let age = Duration::try_from(now.duration_since(created)).unwrap_or_default();
    window.checked_sub(age).filter(|wait| !wait.is_zero())
}

async fn apply<K>(ctx: &Context, api: &Api<K>, object: K) -> Result<(String, Outcome), Error>
where
    K: Resource<DynamicType = ()> + Serialize + DeserializeOwned + Clone + std::fmt::Debug,
{
    let kind = K::kind(&()).into_owned();
    let name = object.name_any();
    let namespace = object.namespace().unwrap_or_default();
    let written = if kind == "StatefulSet" {
        apply_or_recreate(api, &object).await
    } else {
        apply_if_changed(api, &object).await
    };
    let outcome = written.map_err(|source| Error::Apply {
        kind: kind.clone(),
        namespace,
        name,
        source,
    })?;
    let outcome_label = match outcome {
        Outcome::Written => "written",
        Outcome::Unchanged => "unchanged",
        Outcome::Terminating => "terminating",
    };
    ctx.metrics
        .applies
        .get_or_create(&WriteLabels {
            kind: kind.clone(),
            outcome: outcome_label,
        })
        .inc();
    Ok((kind, outcome))
}

/// Applies `status` (the fields `manager` owns) to the status subresource of `object`;
/// returns the object as written.
pub async fn write_status<K>(
    ctx: &Context,
    object: &K,
    manager: FieldManager,
    status: &impl Serialize,
) -> Result<K, Error>
where
    K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
        + DeserializeOwned
        + Clone
        + std::fmt::Debug,
{
    let namespace = object.namespace().unwrap_or_default();
    let name = object.name_any();
    let body = json!({
        "apiVersion": K::api_version(&()),
        "kind": K::kind(&()),
        "metadata": {"name": name, "namespace": namespace},
        "status": status,
    });
    let api = Api::<K>::namespaced(ctx.client.clone(), &namespace);
    let written = api
        .patch_status(&name, &PatchParams::apply(manager.name()).force(), &Patch::Apply(&body))
        .await
        .map_err(|source| Error::Status {
            kind: K::kind(&()).into_owned(),
            namespace,
            name,
            source,
        })?;
    ctx.metrics.count_status_write(&K::kind(&()));
    Ok(written)
}
