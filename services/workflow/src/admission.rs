//! A run's admissions with the scheduler: the run's own (one run against the project's `runs` quota) and each
//! task's (its CPU, memory and GPUs, while it runs). The engine asks as the workflow service's account acting for
//! the run's user, so the scheduler checks that user's membership and quotas.

use cube_kit::identity::act_for;
use cube_kit::{ApiError, Channel};
use cube_proto::cube::scheduler::v1::admission_service_client::AdmissionServiceClient;
use cube_proto::cube::scheduler::v1::batch_admit_result::Result as Outcome;
use cube_proto::cube::scheduler::v1::{AdmissionState, AdmitRequest, BatchAdmitRequest, ReleaseRequest, WorkloadKind};
use tonic::{Code, Request};

use crate::access::upstream;

/// The most workloads one `BatchAdmit` takes.
const BATCH: usize = 1000;

/// The scheduler's admission, reached with the workflow service's token.
#[derive(Clone)]
pub(crate) struct Admission {
    scheduler: Channel,
    token: String,
}

impl std::fmt::Debug for Admission {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Admission")
    }
}

/// What admission said of one workload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// It may start.
    Admitted,
    /// A quota holds it back, for this reason.
    Queued(String),
}

/// One task to admit: its admission name and the resources its pod holds.
#[derive(Debug, Clone)]
pub(crate) struct TaskAsk {
    /// `projects/{p}/pipelines/{x}/runs/{r}/tasks/{t}`.
    pub(crate) workload: String,
    /// CPU, as the scheduler reads it.
    pub(crate) cpu: String,
    /// Memory.
    pub(crate) memory: String,
    /// GPUs.
    pub(crate) gpu: String,
}

/// The admission name of run `run` of `project`'s `pipeline`.
pub(crate) fn run_workload(project: &str, pipeline: &str, run: &str) -> String {
    format!("projects/{project}/pipelines/{pipeline}/runs/{run}")
}

/// The admission name of task `task` of that run.
pub(crate) fn task_workload(project: &str, pipeline: &str, run: &str, task: &str) -> String {
    format!("{}/tasks/{task}", run_workload(project, pipeline, run))
}

impl Admission {
    /// Admission through `scheduler`, as the service account whose token is `token`.
    pub(crate) fn new(scheduler: Channel, token: String) -> Self {
        Self { scheduler, token }
    }

    /// `message` as a call of the service account acting for `user`.
    fn acting<T>(&self, user: &str, message: T) -> Result<Request<T>, ApiError> {
        let mut request = Request::new(message);
        act_for(&mut request, &self.token, &format!("users/{user}"))?;
        Ok(request)
    }

    /// Admits a run of `project` for `user` (counting one run).
    pub(crate) async fn admit_run(&self, user: &str, project: &str, workload: &str) -> Result<Verdict, ApiError> {
        let request = self.acting(
            user,
            AdmitRequest {
                workload: workload.to_owned(),
                project: format!("projects/{project}"),
                kind: WorkloadKind::Run as i32,
                ..AdmitRequest::default()
            },
        )?;
        let admission = AdmissionServiceClient::new(self.scheduler.clone())
            .admit(request)
            .await
            .map_err(|status| upstream("scheduler", status))?
            .into_inner();
        Ok(verdict(admission.state(), admission.reason))
    }

    /// Admits tasks of `project` for `user`, as many as one call takes; each task's verdict, by admission name.
    pub(crate) async fn admit_tasks(
        &self,
        user: &str,
        project: &str,
        tasks: &[TaskAsk],
    ) -> Result<Vec<(String, Verdict)>, ApiError> {
        let mut verdicts = Vec::new();
        for chunk in tasks.chunks(BATCH) {
            let request = self.acting(
                user,
                BatchAdmitRequest {
                    project: format!("projects/{project}"),
                    requests: chunk
                        .iter()
                        .map(|task| AdmitRequest {
                            workload: task.workload.clone(),
                            project: String::new(),
                            kind: WorkloadKind::Task as i32,
                            cpu: task.cpu.clone(),
                            memory: task.memory.clone(),
                            gpu: task.gpu.clone(),
                        })
                        .collect(),
                },
            )?;
            let results = AdmissionServiceClient::new(self.scheduler.clone())
                .batch_admit(request)
                .await
                .map_err(|status| upstream("scheduler", status))?
                .into_inner()
                .results;
            for result in results {
                let verdict = match result.result {
                    Some(Outcome::Admission(admission)) => verdict(admission.state(), admission.reason),
                    Some(Outcome::Error(error)) => Verdict::Queued(format!("not admitted: {}", error.message)),
                    None => Verdict::Queued("not admitted".to_owned()),
                };
                verdicts.push((result.workload, verdict));
            }
        }
        Ok(verdicts)
    }

    /// Releases what each of `workloads` holds, one after the other (they give back to the same project's
    /// usage, which concurrent releases would only fight over).
    pub(crate) async fn release_each(&self, user: &str, workloads: Vec<String>) -> Result<(), ApiError> {
        for workload in workloads {
            self.release(user, &workload).await?;
        }
        Ok(())
    }

    /// Releases what `workload` holds; one that holds nothing is released already.
    pub(crate) async fn release(&self, user: &str, workload: &str) -> Result<(), ApiError> {
        let request = self.acting(
            user,
            ReleaseRequest {
                workload: workload.to_owned(),
            },
        )?;
        match AdmissionServiceClient::new(self.scheduler.clone())
            .release(request)
            .await
        {
            Ok(_) => Ok(()),
            Err(status) if status.code() == Code::NotFound => Ok(()),
            Err(status) => Err(upstream("scheduler", status)),
        }
    }
}

fn verdict(state: AdmissionState, reason: String) -> Verdict {
    match state {
        AdmissionState::Admitted => Verdict::Admitted,
        _ => Verdict::Queued(reason),
    }
}
