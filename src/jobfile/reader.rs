//! Typed access to a job file's keys, with errors that name the key.

use std::path::Path;

use serde_json::{Map, Number, Value};
use yaml_rust2::{Yaml, YamlLoader};

use crate::error::Error;

/// YAML text (the first document) as a JSON value. Integers stay integers; `.inf`/`.nan` and
/// aliases that do not resolve become `null`.
pub fn yaml_to_json(text: &str) -> Result<Value, String> {
    let docs = YamlLoader::load_from_str(text).map_err(|e| e.to_string())?;
    Ok(docs.into_iter().next().map_or(Value::Null, convert))
}

fn convert(y: Yaml) -> Value {
    match y {
        Yaml::Real(s) => s
            .parse::<f64>()
            .ok()
            .and_then(Number::from_f64)
            .map_or(Value::Null, Value::Number),
        Yaml::Integer(i) => Value::Number(i.into()),
        Yaml::String(s) => Value::String(s),
        Yaml::Boolean(b) => Value::Bool(b),
        Yaml::Array(a) => Value::Array(a.into_iter().map(convert).collect()),
        Yaml::Hash(h) => Value::Object(
            h.into_iter()
                .map(|(k, v)| {
                    let key = match k {
                        Yaml::String(s) => s,
                        Yaml::Integer(i) => i.to_string(),
                        Yaml::Real(r) => r,
                        Yaml::Boolean(b) => b.to_string(),
                        _ => String::new(),
                    };
                    (key, convert(v))
                })
                .collect(),
        ),
        Yaml::Null | Yaml::Alias(_) | Yaml::BadValue => Value::Null,
    }
}

/// A mapping of the file (the top level or a nested section) with typed getters. A key whose
/// value is `null` counts as absent, as it does for the frameworks' dataclasses.
pub struct Reader<'a> {
    map: &'a Map<String, Value>,
    path: &'a Path,
    prefix: String,
}

impl<'a> Reader<'a> {
    pub fn new(map: &'a Map<String, Value>, path: &'a Path) -> Reader<'a> {
        Reader {
            map,
            path,
            prefix: String::new(),
        }
    }

    /// The dotted name of `key` in this section (for provenance and errors).
    pub fn name(&self, key: &str) -> String {
        format!("{}{key}", self.prefix)
    }

    pub fn error(&self, key: &str, problem: impl Into<String>) -> Error {
        Error::JobFile {
            path: self.path.to_path_buf(),
            key: self.name(key),
            problem: problem.into(),
        }
    }

    pub fn get(&self, key: &str) -> Option<&'a Value> {
        self.map.get(key).filter(|v| !v.is_null())
    }

    pub fn has(&self, key: &str) -> bool {
        self.get(key).is_some()
    }

    /// A nested mapping, e.g. `peft_config`.
    pub fn section(&self, key: &str) -> Option<Reader<'a>> {
        match self.get(key) {
            Some(Value::Object(m)) => Some(Reader {
                map: m,
                path: self.path,
                prefix: format!("{}{key}.", self.prefix),
            }),
            _ => None,
        }
    }

    pub fn str(&self, key: &str) -> Result<Option<&'a str>, Error> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(v) => Err(self.error(key, format!("is {v}; expected a string"))),
        }
    }

    /// A boolean; YAML/CLI spellings `"true"`/`"false"` are accepted.
    pub fn bool(&self, key: &str) -> Result<Option<bool>, Error> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(Value::String(s)) if s.eq_ignore_ascii_case("true") => Ok(Some(true)),
            Some(Value::String(s)) if s.eq_ignore_ascii_case("false") => Ok(Some(false)),
            Some(v) => Err(self.error(key, format!("is {v}; expected true or false"))),
        }
    }

    /// A positive integer.
    pub fn count(&self, key: &str) -> Result<Option<u128>, Error> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => match v
                .as_u64()
                .or_else(|| v.as_str().and_then(|s| s.parse().ok()))
            {
                Some(n) if n > 0 => Ok(Some(u128::from(n))),
                _ => Err(self.error(key, format!("is {v}; expected a positive integer"))),
            },
        }
    }

    pub fn float(&self, key: &str) -> Result<Option<f64>, Error> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => match v
                .as_f64()
                .or_else(|| v.as_str().and_then(|s| s.parse().ok()))
            {
                Some(x) if x.is_finite() => Ok(Some(x)),
                _ => Err(self.error(key, format!("is {v}; expected a number"))),
            },
        }
    }

    /// Whether a key is present and not `false`/`0`/empty: the test for "this feature is on".
    pub fn truthy(&self, key: &str) -> bool {
        match self.get(key) {
            None => false,
            Some(Value::Bool(b)) => *b,
            Some(Value::Number(n)) => n.as_f64().is_some_and(|x| x != 0.0),
            Some(Value::String(s)) => !s.is_empty() && !s.eq_ignore_ascii_case("false"),
            Some(Value::Array(a)) => !a.is_empty(),
            Some(Value::Object(o)) => !o.is_empty(),
            Some(Value::Null) => false,
        }
    }

    /// Every key of this section.
    pub fn keys(&self) -> impl Iterator<Item = &'a String> {
        self.map.keys()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn yaml_scalars_keep_their_types() {
        let v = yaml_to_json("a: 1\nb: 2.5e-4\nc: true\nd: null\ne: [q_proj, v_proj]\n").unwrap();
        assert_eq!(v["a"], serde_json::json!(1));
        assert_eq!(v["b"], serde_json::json!(2.5e-4));
        assert_eq!(v["c"], serde_json::json!(true));
        assert!(v["d"].is_null());
        assert_eq!(v["e"][1], serde_json::json!("v_proj"));
    }

    #[test]
    fn errors_name_the_nested_key() {
        let v = yaml_to_json("peft_config:\n  r: many\n").unwrap();
        let path = Path::new("job.yaml");
        let r = Reader::new(v.as_object().unwrap(), path);
        let e = r.section("peft_config").unwrap().count("r").unwrap_err();
        assert!(e.to_string().contains("`peft_config.r`"), "{e}");
    }
}
