//! The DAG of a pipeline's tasks: what makes one valid, and which tasks come after which.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use cube_kit::FieldViolation;
use cube_proto::cube::workflow::v1::Task;

/// The longest task name: its pods are named `{task}-{run}-{attempt}`, which must stay a DNS label.
pub(crate) const MAX_TASK_NAME: usize = 40;

/// Whether `name` is a DNS-1123 label of at most `max` characters: lowercase letters, digits and `-`, starting
/// with a letter and ending with a letter or digit.
pub(crate) fn is_label(name: &str, max: usize) -> bool {
    let bytes = name.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= max
        && bytes[0].is_ascii_lowercase()
        && bytes[bytes.len() - 1].is_ascii_alphanumeric()
        && bytes
            .iter()
            .all(|byte| byte.is_ascii_lowercase() || byte.is_ascii_digit() || *byte == b'-')
}

/// The problems of `tasks`' names and edges, one violation each (fields under `field`, e.g. `pipeline.tasks`):
/// names that are not DNS labels or appear twice, edges to unknown tasks or to the task itself, and one cycle,
/// named in order.
pub(crate) fn violations(field: &str, tasks: &[Task]) -> Vec<FieldViolation> {
    let mut found = Vec::new();
    let mut seen = HashMap::new();
    for (index, task) in tasks.iter().enumerate() {
        if !is_label(&task.name, MAX_TASK_NAME) {
            found.push(FieldViolation::new(
                format!("{field}[{index}].name"),
                format!(
                    "{:?} is not a task name: lowercase letters, digits and '-', starting with a letter, at most \
                     {MAX_TASK_NAME} characters",
                    task.name
                ),
            ));
        }
        if let Some(first) = seen.insert(task.name.as_str(), index) {
            found.push(FieldViolation::new(
                format!("{field}[{index}].name"),
                format!("task {:?} is also task {first}; names must be unique", task.name),
            ));
        }
    }
    for (index, task) in tasks.iter().enumerate() {
        for (edge, upstream) in task.upstream.iter().enumerate() {
            if upstream == &task.name {
                found.push(FieldViolation::new(
                    format!("{field}[{index}].upstream[{edge}]"),
                    format!("task {:?} cannot come after itself", task.name),
                ));
            } else if !seen.contains_key(upstream.as_str()) {
                found.push(FieldViolation::new(
                    format!("{field}[{index}].upstream[{edge}]"),
                    format!("no task is named {upstream:?}"),
                ));
            }
        }
    }
    if let Some(cycle) = cycle(tasks) {
        found.push(FieldViolation::new(
            field.to_owned(),
            format!("the tasks form a cycle: {} -> {}", cycle.join(" -> "), cycle[0]),
        ));
    }
    found
}

/// One cycle of `tasks`' edges (other than a task after itself), each task once, in the order the edges go, or
/// `None` when they form a DAG.
fn cycle(tasks: &[Task]) -> Option<Vec<String>> {
    let index: HashMap<&str, usize> = tasks
        .iter()
        .enumerate()
        .map(|(i, task)| (task.name.as_str(), i))
        .collect();
    // Edges from a task to those that come after it.
    let mut after = vec![Vec::new(); tasks.len()];
    for (i, task) in tasks.iter().enumerate() {
        for upstream in &task.upstream {
            if let Some(&j) = index.get(upstream.as_str())
                && j != i
            {
                after[j].push(i);
            }
        }
    }
    // Depth-first, iteratively: 0 unvisited, 1 on the path, 2 done.
    let mut mark = vec![0_u8; tasks.len()];
    for start in 0..tasks.len() {
        if mark[start] != 0 {
            continue;
        }
        let mut path = vec![(start, 0_usize)];
        mark[start] = 1;
        while let Some(&mut (node, ref mut next)) = path.last_mut() {
            if let Some(&child) = after[node].get(*next) {
                *next += 1;
                match mark[child] {
                    0 => {
                        mark[child] = 1;
                        path.push((child, 0));
                    }
                    1 => {
                        let from = path.iter().position(|(on, _)| *on == child).unwrap_or(0);
                        return Some(path[from..].iter().map(|(on, _)| tasks[*on].name.clone()).collect());
                    }
                    _ => {}
                }
            } else {
                mark[node] = 2;
                path.pop();
            }
        }
    }
    None
}

/// `from` and every task downstream of it, by name.
pub(crate) fn downstream(tasks: &[Task], from: &str) -> BTreeSet<String> {
    let mut after: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for task in tasks {
        for upstream in &task.upstream {
            after.entry(upstream.as_str()).or_default().push(task.name.as_str());
        }
    }
    let mut found = BTreeSet::from([from.to_owned()]);
    let mut todo = vec![from];
    while let Some(name) = todo.pop() {
        for next in after.get(name).into_iter().flatten() {
            if found.insert((*next).to_owned()) {
                todo.push(next);
            }
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    fn task(name: &str, upstream: &[&str]) -> Task {
        Task {
            name: name.to_owned(),
            upstream: upstream.iter().map(|name| (*name).to_owned()).collect(),
            ..Task::default()
        }
    }

    #[test]
    fn a_diamond_is_valid() {
        let tasks = [
            task("a", &[]),
            task("b", &["a"]),
            task("c", &["a"]),
            task("d", &["b", "c"]),
        ];
        assert_eq!(violations("tasks", &tasks), Vec::new());
    }

    #[test]
    fn a_cycle_is_named_in_order() {
        let tasks = [
            task("a", &[]),
            task("b", &["a", "d"]),
            task("c", &["b"]),
            task("d", &["c"]),
        ];
        let found = violations("pipeline.tasks", &tasks);
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(found[0].field, "pipeline.tasks");
        assert_eq!(found[0].description, "the tasks form a cycle: b -> c -> d -> b");
    }

    #[test]
    fn bad_names_duplicates_and_unknown_edges_are_each_named() {
        let tasks = [task("Train", &[]), task("b", &["nope"]), task("b", &["b"])];
        let fields: Vec<String> = violations("tasks", &tasks).into_iter().map(|v| v.field).collect();
        assert_eq!(
            fields,
            [
                "tasks[0].name",
                "tasks[2].name",
                "tasks[1].upstream[0]",
                "tasks[2].upstream[0]"
            ]
        );
    }

    #[test]
    fn labels_follow_kubernetes() {
        for good in ["a", "train-1", "x9"] {
            assert!(is_label(good, 40), "{good}");
        }
        for bad in ["", "1a", "a-", "A", "a_b", &"a".repeat(41)] {
            assert!(!is_label(bad, 40), "{bad}");
        }
    }

    #[test]
    fn downstream_follows_every_edge() {
        let tasks = [
            task("a", &[]),
            task("b", &["a"]),
            task("c", &["a"]),
            task("d", &["b", "c"]),
            task("e", &[]),
        ];
        assert_eq!(
            downstream(&tasks, "b").into_iter().collect::<Vec<_>>(),
            ["b".to_owned(), "d".to_owned()]
        );
    }
}
