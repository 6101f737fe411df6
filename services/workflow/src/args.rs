//! Template arguments: a task's values checked against its template's schema (cube-studio's types), and turned
//! into the command line cube-studio's job images expect (`--key value`; a bare `--flag` for true; JSON for lists
//! and objects; `images` and `workdir` replacing the image and working directory).

use std::collections::BTreeMap;

use cube_kit::FieldViolation;
use cube_proto::cube::workflow::v1::{ArgSpec, ArgType};
use prost_types::value::Kind;
use serde_json::Value;

/// The argument keys that change the task's image and working directory instead of its command line.
const IMAGES: &str = "images";
const WORKDIR: &str = "workdir";

/// A protobuf `Struct` as JSON.
pub(crate) fn struct_to_json(value: &prost_types::Struct) -> serde_json::Map<String, Value> {
    value
        .fields
        .iter()
        .map(|(key, value)| (key.clone(), to_json(value)))
        .collect()
}

fn to_json(value: &prost_types::Value) -> Value {
    match &value.kind {
        None | Some(Kind::NullValue(_)) => Value::Null,
        Some(Kind::NumberValue(number)) => serde_json::Number::from_f64(*number).map_or(Value::Null, Value::Number),
        Some(Kind::StringValue(text)) => Value::String(text.clone()),
        Some(Kind::BoolValue(flag)) => Value::Bool(*flag),
        Some(Kind::StructValue(object)) => Value::Object(struct_to_json(object)),
        Some(Kind::ListValue(list)) => Value::Array(list.values.iter().map(to_json).collect()),
    }
}

/// The key of an argument without its leading dashes (`--images` → `images`).
fn bare(name: &str) -> &str {
    name.trim_start_matches('-')
}

/// The type an argument spec declares (`STR` when unspecified).
fn type_of(kind: i32) -> ArgType {
    match ArgType::try_from(kind) {
        Ok(ArgType::Unspecified) | Err(_) => ArgType::Str,
        Ok(kind) => kind,
    }
}

/// The problems of a template's argument schema, fields under `field` (`job_template.args`).
pub(crate) fn schema_violations(field: &str, specs: &[ArgSpec]) -> Vec<FieldViolation> {
    let mut found = Vec::new();
    let mut names = BTreeMap::new();
    for (index, spec) in specs.iter().enumerate() {
        let at = |part: &str| format!("{field}[{index}].{part}");
        let key = bare(&spec.name);
        let well_formed = !key.is_empty()
            && key.len() <= 100
            && key
                .bytes()
                .all(|byte| byte.is_ascii_alphanumeric() || matches!(byte, b'_' | b'-' | b'.'));
        if !well_formed {
            found.push(FieldViolation::new(
                at("name"),
                format!("{:?} is not an argument name such as --epochs", spec.name),
            ));
        }
        if let Some(first) = names.insert(key.to_owned(), index) {
            found.push(FieldViolation::new(
                at("name"),
                format!("{:?} is also argument {first}", spec.name),
            ));
        }
        let kind = type_of(spec.r#type);
        if matches!(kind, ArgType::Enum | ArgType::Multiple) && spec.choices.is_empty() {
            found.push(FieldViolation::new(
                at("choices"),
                "enum and multiple arguments need choices",
            ));
        }
        if let (Some(minimum), Some(maximum)) = (spec.minimum, spec.maximum)
            && minimum > maximum
        {
            found.push(FieldViolation::new(at("maximum"), "is below minimum"));
        }
        if !spec.default_json.is_empty() {
            match serde_json::from_str::<Value>(&spec.default_json) {
                Ok(value) => {
                    if let Err(problem) = check(spec, &value) {
                        found.push(FieldViolation::new(at("default_json"), problem));
                    }
                }
                Err(error) => found.push(FieldViolation::new(at("default_json"), format!("is not JSON: {error}"))),
            }
        }
    }
    found
}

/// Why `value` is not a value of `spec`, if it is not.
fn check(spec: &ArgSpec, value: &Value) -> Result<(), String> {
    let kind = type_of(spec.r#type);
    let number = |value: &Value| match value {
        Value::Number(number) => number.as_f64(),
        Value::String(text) => text.trim().parse::<f64>().ok(),
        _ => None,
    };
    let in_range = |x: f64| -> Result<(), String> {
        if let Some(minimum) = spec.minimum
            && x < minimum
        {
            return Err(format!("{x} is below the minimum {minimum}"));
        }
        if let Some(maximum) = spec.maximum
            && x > maximum
        {
            return Err(format!("{x} is above the maximum {maximum}"));
        }
        Ok(())
    };
    match kind {
        ArgType::Int => match number(value) {
            Some(x) if x.fract() == 0.0 => in_range(x),
            _ => Err(format!("{value} is not a whole number")),
        },
        ArgType::Float => match number(value) {
            Some(x) if x.is_finite() => in_range(x),
            _ => Err(format!("{value} is not a number")),
        },
        ArgType::Bool => match value {
            Value::Bool(_) => Ok(()),
            Value::String(text) if matches!(text.as_str(), "true" | "false") => Ok(()),
            _ => Err(format!("{value} is not true or false")),
        },
        ArgType::Str | ArgType::Text | ArgType::Unspecified => match value {
            Value::String(text) if kind == ArgType::Str && text.contains('\n') => {
                Err("a str argument is one line; use text for several".to_owned())
            }
            Value::String(_) | Value::Number(_) => Ok(()),
            _ => Err(format!("{value} is not a string")),
        },
        ArgType::Enum => match value {
            Value::String(text) if spec.choices.contains(text) => Ok(()),
            _ => Err(format!("{value} is not one of {:?}", spec.choices)),
        },
        ArgType::Multiple => match value {
            Value::Array(items)
                if items
                    .iter()
                    .all(|item| item.as_str().is_some_and(|text| spec.choices.iter().any(|c| c == text))) =>
            {
                Ok(())
            }
            _ => Err(format!("{value} is not a list of values from {:?}", spec.choices)),
        },
        ArgType::List => match value {
            Value::Array(items) => {
                let item = ArgSpec {
                    r#type: spec.item_type,
                    ..ArgSpec::default()
                };
                if spec.item_type == 0 {
                    return Ok(());
                }
                items.iter().try_for_each(|value| check(&item, value))
            }
            _ => Err(format!("{value} is not a list")),
        },
        ArgType::Dict => match value {
            Value::Object(_) => Ok(()),
            _ => Err(format!("{value} is not an object")),
        },
        ArgType::Json => Ok(()),
    }
}

/// Checks a task's `args` (fields under `field`, e.g. `pipeline.tasks[0].args`) against `specs`: one violation
/// per unknown argument, missing required argument, value of the wrong type, choice or range, and change of an
/// argument that is not editable.
pub(crate) fn violations(field: &str, specs: &[ArgSpec], args: &serde_json::Map<String, Value>) -> Vec<FieldViolation> {
    let mut found = Vec::new();
    for (key, value) in args {
        let at = format!("{field}.{key}");
        let Some(spec) = specs.iter().find(|spec| bare(&spec.name) == bare(key)) else {
            let known: Vec<&str> = specs.iter().map(|spec| spec.name.as_str()).collect();
            found.push(FieldViolation::new(
                at,
                format!("the template takes no argument {key:?}; it takes {known:?}"),
            ));
            continue;
        };
        if value.is_null() {
            continue;
        }
        if let Err(problem) = check(spec, value) {
            found.push(FieldViolation::new(at, problem));
        } else if !spec.editable
            && !spec.default_json.is_empty()
            && serde_json::from_str::<Value>(&spec.default_json).ok().as_ref() != Some(value)
        {
            found.push(FieldViolation::new(
                at,
                "is not editable: it keeps the template's default",
            ));
        }
    }
    for spec in specs {
        let given = args
            .iter()
            .any(|(key, value)| bare(key) == bare(&spec.name) && !is_empty(value));
        if spec.required && !given && spec.default_json.is_empty() {
            found.push(FieldViolation::new(
                format!("{field}.{}", spec.name),
                "is required by the template",
            ));
        }
    }
    found
}

/// Whether a value gives nothing: null or an empty string.
fn is_empty(value: &Value) -> bool {
    match value {
        Value::Null => true,
        Value::String(text) => text.is_empty(),
        _ => false,
    }
}

/// What a task's arguments make of its command line, image and working directory.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct Rendered {
    /// The arguments, in the schema's order.
    pub(crate) argv: Vec<String>,
    /// The image the `images` argument names.
    pub(crate) image: Option<String>,
    /// The working directory the `workdir` argument names.
    pub(crate) working_dir: Option<String>,
}

/// The command line of `args` (validated) under `specs`, defaults filling what is not given.
pub(crate) fn render(specs: &[ArgSpec], args: &serde_json::Map<String, Value>) -> Rendered {
    let mut rendered = Rendered::default();
    for spec in specs {
        let key = bare(&spec.name);
        let given = args
            .iter()
            .find(|(name, _)| bare(name) == key)
            .map(|(_, value)| value.clone());
        let value = match given {
            Some(value) if !value.is_null() => value,
            _ => match serde_json::from_str::<Value>(&spec.default_json) {
                Ok(value) => value,
                Err(_) => continue,
            },
        };
        let text = match &value {
            Value::Null => continue,
            Value::Bool(false) => continue,
            Value::String(text) if text.is_empty() => continue,
            Value::String(text) if type_of(spec.r#type) == ArgType::Bool => {
                if text == "true" {
                    rendered.argv.push(flag(&spec.name));
                }
                continue;
            }
            Value::Bool(true) => {
                rendered.argv.push(flag(&spec.name));
                continue;
            }
            Value::String(text) => text.clone(),
            Value::Number(number) => match number.as_f64() {
                Some(x) if x.fract() == 0.0 && x.abs() < 9.0e15 => format!("{}", x as i64),
                _ => number.to_string(),
            },
            Value::Array(_) | Value::Object(_) => value.to_string(),
        };
        match key {
            IMAGES => rendered.image = Some(text),
            WORKDIR => rendered.working_dir = Some(text),
            _ => {
                rendered.argv.push(flag(&spec.name));
                rendered.argv.push(text);
            }
        }
    }
    rendered
}

/// The flag of an argument: its name as the schema gives it, `--` added when it has no dash.
fn flag(name: &str) -> String {
    if name.starts_with('-') {
        name.to_owned()
    } else {
        format!("--{name}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(name: &str, kind: ArgType) -> ArgSpec {
        ArgSpec {
            name: name.to_owned(),
            r#type: kind as i32,
            editable: true,
            ..ArgSpec::default()
        }
    }

    fn args(json: &str) -> serde_json::Map<String, Value> {
        serde_json::from_str(json).expect("json")
    }

    #[test]
    fn argv_follows_cube_studios_rules() {
        let specs = [
            spec("--epochs", ArgType::Int),
            spec("--debug", ArgType::Bool),
            spec("--quiet", ArgType::Bool),
            spec("--config", ArgType::Dict),
            spec("--layers", ArgType::List),
            spec("--name", ArgType::Str),
            spec("--empty", ArgType::Str),
            spec("images", ArgType::Str),
            spec("--workdir", ArgType::Str),
            ArgSpec {
                default_json: "0.5".into(),
                ..spec("--rate", ArgType::Float)
            },
        ];
        let given = args(
            r#"{"--epochs": 3, "--debug": true, "--quiet": false, "--config": {"a": 1}, "--layers": [1, 2],
                "--name": "x y", "--empty": "", "images": "busybox:1", "--workdir": "/w"}"#,
        );
        assert_eq!(violations("args", &specs, &given), Vec::new());
        let rendered = render(&specs, &given);
        assert_eq!(
            rendered.argv,
            [
                "--epochs",
                "3",
                "--debug",
                "--config",
                r#"{"a":1}"#,
                "--layers",
                "[1,2]",
                "--name",
                "x y",
                "--rate",
                "0.5"
            ]
        );
        assert_eq!(rendered.image.as_deref(), Some("busybox:1"));
        assert_eq!(rendered.working_dir.as_deref(), Some("/w"));
    }

    #[test]
    fn each_bad_argument_is_its_own_violation() {
        let specs = [
            ArgSpec {
                minimum: Some(1.0),
                maximum: Some(10.0),
                ..spec("--epochs", ArgType::Int)
            },
            ArgSpec {
                choices: vec!["adam".into(), "sgd".into()],
                ..spec("--optimizer", ArgType::Enum)
            },
            ArgSpec {
                required: true,
                ..spec("--data", ArgType::Str)
            },
            ArgSpec {
                default_json: "\"fixed\"".into(),
                editable: false,
                ..spec("--mode", ArgType::Str)
            },
            spec("--flag", ArgType::Bool),
        ];
        let given = args(r#"{"--epochs": 11, "--optimizer": "rmsprop", "--mode": "other", "--flag": 3, "--nope": 1}"#);
        let found: Vec<String> = violations("tasks[0].args", &specs, &given)
            .into_iter()
            .map(|v| v.field)
            .collect();
        assert_eq!(
            found,
            [
                "tasks[0].args.--epochs",
                "tasks[0].args.--flag",
                "tasks[0].args.--mode",
                "tasks[0].args.--nope",
                "tasks[0].args.--optimizer",
                "tasks[0].args.--data"
            ]
        );
    }

    #[test]
    fn a_schema_needs_choices_for_enums_and_valid_defaults() {
        let specs = [
            spec("--a", ArgType::Enum),
            ArgSpec {
                default_json: "\"x\"".into(),
                ..spec("--b", ArgType::Int)
            },
            spec("--a", ArgType::Str),
            spec("bad name", ArgType::Str),
        ];
        let found: Vec<String> = schema_violations("args", &specs).into_iter().map(|v| v.field).collect();
        assert_eq!(
            found,
            [
                "args[0].choices",
                "args[1].default_json",
                "args[2].name",
                "args[3].name"
            ]
        );
    }
}
