//! The checks that turn the file as written ([`super::schema`]) into the model
//! ([`super::Loaded`]): every error names the file and, where it can, the line and the key.

use super::*;

impl Loaded {
    /// Parses and checks `text`; `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Loaded> {
        let config: Config = toml::from_str(text)
            .map_err(|e| Error::invalid(format!("config {origin}: {}", e.to_string().trim())))?;
        let at = |span: std::ops::Range<usize>, key: &str, why: String| {
            let line = text[..span.start.min(text.len())].matches('\n').count() + 1;
            Error::invalid(format!("config {origin}:{line}: {key}: {why}"))
        };
        let state_dir = match &config.daemon.state_dir {
            Some(d) => d.clone(),
            None => default_state_dir(),
        };
        let time_zone = match &config.daemon.time_zone {
            Some(name) => jiff::tz::TimeZone::get(name).map_err(|e| {
                Error::invalid(format!(
                    "config {origin}: daemon.time_zone {name:?} is not a known IANA time zone ({e})"
                ))
            })?,
            None => jiff::tz::TimeZone::system(),
        };
        if config.daemon.catch_up > Duration::from_secs(366 * 86400) {
            return Err(Error::invalid(format!(
                "config {origin}: daemon.catch_up is at most 366 days"
            )));
        }
        if config.daemon.max_concurrent_jobs == 0 {
            return Err(Error::invalid(format!(
                "config {origin}: daemon.max_concurrent_jobs must be at least 1"
            )));
        }
        let expand = |s: &str| s.replace("{state_dir}", &state_dir.to_string_lossy());
        let expand_path = |p: &PathBuf| PathBuf::from(expand(&p.to_string_lossy()));
        let mut repositories = BTreeMap::new();
        for (name, r) in config.repositories {
            let secrets = [
                r.key_file.is_some(),
                r.password_file.is_some(),
                r.key_credential.is_some(),
            ];
            if secrets.iter().filter(|s| **s).count() != 1 {
                return Err(Error::invalid(format!(
                    "config {origin}: repositories.{name}: give exactly one of key_file, \
                     password_file, key_credential"
                )));
            }
            if let Some(p) = &r.retention {
                p.validate().map_err(|e| {
                    Error::invalid(format!(
                        "config {origin}: repositories.{name}.retention: {e}"
                    ))
                })?;
            }
            if let Some(after) = r.erase_after {
                let key = format!("config {origin}: repositories.{name}.erase_after");
                if after.is_zero() {
                    return Err(Error::invalid(format!("{key} must be more than 0")));
                }
                // Retention and erasure must agree: an erasure that destroyed what the policy
                // keeps would make the policy a lie.
                if let Some(max) = r.retention.as_ref().and_then(|p| p.max_age) {
                    if after < max {
                        return Err(Error::invalid(format!(
                            "{key} ({}) is shorter than retention.max_age ({}): erasure would \
                             destroy snapshots the retention policy keeps",
                            crate::retention::show(after),
                            crate::retention::show(max)
                        )));
                    }
                }
                if r.prune.as_ref().and_then(|p| p.schedule.as_ref()).is_none() {
                    return Err(Error::invalid(format!(
                        "{key} is enforced by the scheduled maintenance: give the repository \
                         prune = {{ schedule = \"...\" }}"
                    )));
                }
            }
            if r.init && r.key_file.is_none() {
                return Err(Error::invalid(format!(
                    "config {origin}: repositories.{name}: init needs a key_file (created when \
                     missing)"
                )));
            }
            repositories.insert(
                name,
                RepositoryConfig {
                    url: expand(&r.url),
                    key_file: r.key_file.as_ref().map(expand_path),
                    password_file: r.password_file.as_ref().map(expand_path),
                    ..r
                },
            );
        }
        // A reference to a repository must name a `[repositories.NAME]` section.
        let known_repository = |r: &Spanned<String>, key: &str| -> Result<()> {
            if repositories.contains_key(r.get_ref()) {
                return Ok(());
            }
            Err(at(
                r.span(),
                key,
                format!(
                    "no [repositories.{}] section (there are: {})",
                    r.get_ref(),
                    repositories.keys().cloned().collect::<Vec<_>>().join(", ")
                ),
            ))
        };
        let mut jobs = Vec::new();
        for (name, j) in config.jobs {
            if name.is_empty() || name.contains(['/', '\0']) {
                return Err(Error::invalid(format!(
                    "config {origin}: job name {name:?} must be non-empty without '/'"
                )));
            }
            let key = |k: &str| format!("jobs.{name}.{k}");
            known_repository(&j.repository, &key("repository"))?;
            let source = match (&j.paths, &j.database, &j.command, &j.postgres_globals) {
                (Some(p), None, None, None) if !p.is_empty() => {
                    JobSource::Paths(p.iter().map(expand_path).collect())
                }
                (None, Some(d), None, None) => JobSource::Database(expand(d)),
                (None, None, Some(c), None) => JobSource::Command(c.clone()),
                (None, None, None, Some(u)) => {
                    let url = expand(u);
                    if crate::source::database::engine_of(&url)
                        != Some(crate::source::database::Engine::Postgres)
                    {
                        return Err(Error::invalid(format!(
                            "config {origin}: {}: {} is not a postgres:// URL",
                            key("postgres_globals"),
                            crate::source::url::redact(&url)
                        )));
                    }
                    JobSource::PostgresGlobals(url)
                }
                _ => {
                    return Err(at(
                        j.schedule.span(),
                        &format!("jobs.{name}"),
                        "give exactly one of paths, database, command, postgres_globals".into(),
                    ));
                }
            };
            let source = server_source(source, &j)
                .map_err(|why| at(j.schedule.span(), &format!("jobs.{name}"), why.to_string()))?;
            let schedule = Schedule::parse(j.schedule.get_ref())
                .map_err(|e| at(j.schedule.span(), &key("schedule"), e.to_string()))?;
            if j.timeout.is_zero() {
                return Err(Error::invalid(format!(
                    "config {origin}: {}: must be more than 0s",
                    key("timeout")
                )));
            }
            jobs.push(Job {
                snapshot_name: j.snapshot_name.clone().unwrap_or_else(|| name.clone()),
                name,
                repository: j.repository.into_inner(),
                source,
                db_password_file: j.db_password_file.as_ref().map(expand_path),
                schedule,
                jitter: j.jitter,
                timeout: j.timeout,
                tags: j.tags,
            });
        }
        let mut copies = Vec::new();
        for (name, c) in config.copies {
            let key = |k: &str| format!("copies.{name}.{k}");
            known_repository(&c.from, &key("from"))?;
            known_repository(&c.to, &key("to"))?;
            if c.from.get_ref() == c.to.get_ref()
                || repositories[c.from.get_ref()].url == repositories[c.to.get_ref()].url
            {
                return Err(at(
                    c.to.span(),
                    &key("to"),
                    "copies to the repository it copies from".into(),
                ));
            }
            let schedule = Schedule::parse(c.schedule.get_ref())
                .map_err(|e| at(c.schedule.span(), &key("schedule"), e.to_string()))?;
            if c.timeout.is_zero() {
                return Err(Error::invalid(format!(
                    "config {origin}: {}: must be more than 0s",
                    key("timeout")
                )));
            }
            copies.push(CopyRule {
                name,
                from: c.from.into_inner(),
                to: c.to.into_inner(),
                schedule,
                select: c.select,
                names: c.names,
                timeout: c.timeout,
            });
        }
        let mut drills = Vec::new();
        for (name, d) in config.drills {
            let key = |k: &str| format!("drills.{name}.{k}");
            let schedule = Schedule::parse(d.schedule.get_ref())
                .map_err(|e| at(d.schedule.span(), &key("schedule"), e.to_string()))?;
            let job_name = d
                .job
                .as_ref()
                .map_or(name.as_str(), |j| j.get_ref().as_str());
            let job = jobs
                .iter()
                .find(|j| j.name == job_name)
                .cloned()
                .ok_or_else(|| {
                    let why = format!(
                        "no [jobs.{job_name}] section (there are: {})",
                        jobs.iter()
                            .map(|j| j.name.clone())
                            .collect::<Vec<_>>()
                            .join(", ")
                    );
                    match &d.job {
                        Some(j) => at(j.span(), &key("job"), why),
                        None => at(d.schedule.span(), &format!("drills.{name}"), why),
                    }
                })?;
            let repository = match &d.repository {
                Some(r) => {
                    known_repository(r, &key("repository"))?;
                    r.get_ref().clone()
                }
                None => job.repository.clone(),
            };
            let kind = match &job.source {
                JobSource::PostgresGlobals(_) => {
                    return Err(at(
                        d.schedule.span(),
                        &format!("drills.{name}"),
                        format!(
                            "job {} backs up a server's roles, which a drill cannot restore                              without changing the scratch server's roles: drill the                              database jobs (whose drills need those roles on the scratch server)",
                            job.name
                        ),
                    ));
                }
                JobSource::PostgresServer {
                    databases: ServerDatabases::List(list),
                    ..
                } if list.is_empty() => {
                    return Err(at(
                        d.schedule.span(),
                        &format!("drills.{name}"),
                        format!(
                            "job {} backs up a server's roles only: a drill restores databases \
                             (give the job databases or all_databases)",
                            job.name
                        ),
                    ));
                }
                JobSource::PostgresServer { .. } => DrillKind::Postgres,
                JobSource::Paths(_) => DrillKind::Directory,
                JobSource::Command(_) => DrillKind::Stream,
                JobSource::Database(url) => match crate::source::database::engine_of(url) {
                    Some(crate::source::database::Engine::Postgres) => DrillKind::Postgres,
                    Some(crate::source::database::Engine::Mysql) => DrillKind::Mysql,
                    _ => DrillKind::Sqlite,
                },
            };
            let here = |why: String| at(d.schedule.span(), &format!("drills.{name}"), why);
            match (kind, &d.scratch) {
                (DrillKind::Postgres | DrillKind::Mysql, None) => {
                    return Err(here(format!(
                        "job {} backs up a database server: give scratch = \"{}://USER@HOST/\", \
                         a server where kluis may create and drop drill databases",
                        job.name,
                        if kind == DrillKind::Postgres {
                            "postgres"
                        } else {
                            "mysql"
                        }
                    )));
                }
                (DrillKind::Postgres | DrillKind::Mysql, Some(url)) => {
                    let engine = crate::source::database::engine_of(url);
                    let want = if kind == DrillKind::Postgres {
                        crate::source::database::Engine::Postgres
                    } else {
                        crate::source::database::Engine::Mysql
                    };
                    if engine != Some(want) {
                        return Err(here(format!(
                            "scratch {url:?} is not a server of the job's engine ({want:?})"
                        )));
                    }
                }
                (_, Some(_)) => {
                    return Err(here(format!(
                        "job {} restores without a server: scratch is for PostgreSQL and MySQL jobs",
                        job.name
                    )));
                }
                (_, None) => {}
            }
            if !d.assert.is_empty() && matches!(kind, DrillKind::Directory | DrillKind::Stream) {
                return Err(here("assertions are SQL: they need a database job".into()));
            }
            for a in &d.assert {
                let Some(db) = &a.database else { continue };
                match &job.source {
                    JobSource::PostgresServer {
                        databases: ServerDatabases::List(list),
                        ..
                    } if !list.contains(db) => {
                        return Err(here(format!(
                            "assertion {:?} is for database {db:?}, which job {} does not back \
                             up (it backs up: {})",
                            a.name,
                            job.name,
                            list.join(", ")
                        )));
                    }
                    JobSource::PostgresServer { .. } => {}
                    _ => {
                        return Err(here(format!(
                            "assertion {:?} names a database: that is for jobs of a whole \
                             server (databases or all_databases)",
                            a.name
                        )));
                    }
                }
            }
            let budget = d
                .budget
                .as_deref()
                .map(|b| {
                    humantime::parse_duration(b)
                        .map_err(|e| here(format!("budget {b:?} is not a duration ({e})")))
                })
                .transpose()?;
            if d.timeout.is_zero() {
                return Err(here("timeout must be more than 0s".into()));
            }
            let prefix = target_prefix(&name);
            if let Some(other) = drills
                .iter()
                .find(|o: &&Drill| target_prefix(&o.name) == prefix)
            {
                return Err(here(format!(
                    "its scratch targets would be named like those of drills.{} ({prefix}...); \
                     rename one",
                    other.name
                )));
            }
            drills.push(Drill {
                name,
                job,
                repository,
                schedule,
                kind,
                scratch: d.scratch.as_deref().map(expand),
                scratch_password_file: d.scratch_password_file.as_ref().map(expand_path),
                older: d.older,
                budget,
                timeout: d.timeout,
                assertions: d.assert,
            });
        }
        let mut prunes: Vec<Maintenance> = Vec::new();
        for (name, r) in &repositories {
            let Some(p) = &r.prune else { continue };
            let key = format!("repositories.{name}.prune");
            if !(0.0..=1.0).contains(&p.repack_threshold) {
                return Err(Error::invalid(format!(
                    "config {origin}: {key}.repack_threshold must be between 0 and 1"
                )));
            }
            // The grace period is what keeps a backup's reused data alive until it commits:
            // it must outlast every run writing to the repository.
            let writers = jobs
                .iter()
                .filter(|j| &j.repository == name)
                .map(|j| (format!("jobs.{}", j.name), j.timeout))
                .chain(
                    copies
                        .iter()
                        .filter(|c| &c.to == name)
                        .map(|c| (format!("copies.{}", c.name), c.timeout)),
                );
            if let Some((writer, timeout)) = writers
                .max_by_key(|(_, t)| *t)
                .filter(|(_, t)| *t >= p.grace)
            {
                return Err(Error::invalid(format!(
                    "config {origin}: {key}.grace ({}) must be longer than the timeout of every job and copy writing to it; {writer}.timeout is {}",
                    humantime::format_duration(p.grace),
                    humantime::format_duration(timeout)
                )));
            }
            if let Some(s) = &p.schedule {
                let schedule = Schedule::parse(s.get_ref())
                    .map_err(|e| at(s.span(), &format!("{key}.schedule"), e.to_string()))?;
                prunes.push(Maintenance {
                    repository: name.clone(),
                    schedule,
                    timeout: p.timeout,
                });
            }
        }
        Ok(Loaded {
            prunes,
            copies,
            drills,
            origin: origin.to_string(),
            daemon: config.daemon,
            http: config.http,
            state_dir,
            time_zone,
            repositories,
            jobs,
        })
    }
}

/// A job's source with `databases`, `all_databases` or `globals`: a whole PostgreSQL server.
fn server_source(source: JobSource, j: &JobConfig) -> std::result::Result<JobSource, String> {
    if j.databases.is_none() && !j.all_databases && !j.globals {
        return Ok(source);
    }
    let url = match source {
        JobSource::Database(url)
            if crate::source::database::engine_of(&url)
                == Some(crate::source::database::Engine::Postgres) =>
        {
            url
        }
        _ => {
            return Err("databases, all_databases and globals go with database = \
                        \"postgres://USER@HOST/\" (a PostgreSQL server)"
                .into());
        }
    };
    let conn =
        crate::source::postgres::PgConn::parse_server(&url, None).map_err(|e| e.to_string())?;
    let databases = match (&j.databases, j.all_databases) {
        (Some(_), true) => return Err("give databases or all_databases, not both".into()),
        (Some(list), false) => {
            if list.is_empty() || list.iter().any(|d| d.is_empty()) {
                return Err("databases must name at least one database, none empty".into());
            }
            if conn.names_database {
                return Err(format!(
                    "with databases, the URL names the server only: {}",
                    crate::source::url::redact(&url)
                ));
            }
            let mut seen = std::collections::BTreeSet::new();
            if let Some(twice) = list.iter().find(|d| !seen.insert(d.as_str())) {
                return Err(format!("databases names {twice:?} twice"));
            }
            ServerDatabases::List(list.clone())
        }
        (None, true) => ServerDatabases::All,
        // The database the URL names, if it names one, beside the roles.
        (None, false) if conn.names_database => ServerDatabases::List(vec![conn.database]),
        (None, false) => ServerDatabases::List(Vec::new()),
    };
    if let ServerDatabases::List(list) = &databases {
        if j.globals && list.iter().any(|d| d == GLOBALS_NAME) {
            return Err(format!(
                "a database named {GLOBALS_NAME:?} would share its snapshot name with the roles"
            ));
        }
    }
    Ok(JobSource::PostgresServer {
        url,
        databases,
        globals: j.globals,
    })
}
