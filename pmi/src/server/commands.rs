//! What each PMI-1 and PMI-2 command does to a [`Job`]: identification and version
//! negotiation, then the command table of each wire (KVS, fences, attributes, name service,
//! finalize, abort, the unsupported spawn family). Every reply goes out as an [`Output`].

use crate::wire::{Message, Wire};

use super::job::{
    ConnId, Event, Job, KEYLEN_MAX, KVSNAME_MAX, NodeWaiter, Output, Pending, VALLEN_MAX,
    error_reply, reply,
};

/// Queue `msg` on `conn`.
fn send(out: &mut Vec<Output>, conn: ConnId, msg: Message) {
    out.push(Output::Send(conn, msg));
}

impl Job {
    /// A whole message arrived on `cid`.
    pub(crate) fn receive(&mut self, cid: ConnId, msg: Message, out: &mut Vec<Output>) {
        let rank = self.rank_of(cid);
        if let Some(r) = rank {
            // Reuses the string's buffer: no allocation per message.
            self.ranks[r as usize].last_command.clone_from(&msg.cmd);
        }
        // Identification and version negotiation are the only messages allowed before the
        // server knows the rank (TCP mode).
        match (msg.wire, msg.cmd.as_str()) {
            (Wire::V1, "init") => {
                if let Some(r) = rank {
                    self.mark_active(r, out);
                }
                let (v, sub) = if msg.get_int("pmi_version") == Some(2) {
                    ("2", "0")
                } else {
                    // 1.1: no tagged/group barriers, which this server does not offer.
                    ("1", "1")
                };
                let m = reply(&msg, "response_to_init")
                    .with("rc", "0")
                    .with("pmi_version", v)
                    .with("pmi_subversion", sub);
                send(out, cid, m);
                return;
            }
            (Wire::V1, "initack") => {
                let id = msg.get_int("pmiid").and_then(|i| u32::try_from(i).ok());
                let result = match (id, rank) {
                    (Some(id), None) => self.bind(cid, id, out).map(|()| id),
                    (Some(id), Some(r)) if id == r => Ok(r),
                    (None, _) => Err("initack without a valid pmiid".to_owned()),
                    (Some(id), Some(r)) => Err(format!("pmiid {id} on the connection of rank {r}")),
                };
                match result {
                    Ok(r) => {
                        let size = self.size.to_string();
                        let rank = r.to_string();
                        let m = reply(&msg, "initack")
                            .with("rc", "0")
                            .with("rank", &rank)
                            .with("size", &size)
                            .with("appnum", self.appnum(r).to_string())
                            .with("debug", "0");
                        send(out, cid, m);
                        // Every PMI-1 client reads these three lines after initack.
                        for (k, v) in [("size", size.as_str()), ("rank", &rank), ("debug", "0")] {
                            send(out, cid, Message::new(Wire::V1, "set").with(k, v));
                        }
                    }
                    Err(e) => self.reject(cid, &msg, "initack", &e, out),
                }
                return;
            }
            (Wire::V2, "fullinit") => {
                let claimed = ["pmirank", "pmiid", "srcid"]
                    .iter()
                    .find_map(|k| msg.get_int(k))
                    .and_then(|i| u32::try_from(i).ok());
                let result = match (rank, claimed) {
                    // The transport knows better than the client (PMI_ID may differ from rank).
                    (Some(r), _) => {
                        self.mark_active(r, out);
                        Ok(r)
                    }
                    (None, Some(c)) => self.bind(cid, c, out).map(|()| c),
                    (None, None) => Err("fullinit without pmirank on a TCP connection".into()),
                };
                match result {
                    Ok(r) => {
                        let m = reply(&msg, "fullinit-response")
                            .with("rc", "0")
                            .with("pmi-version", "2")
                            .with("pmi-subversion", "0")
                            .with("rank", r.to_string())
                            .with("size", self.size.to_string())
                            .with("appnum", self.appnum(r).to_string())
                            .with("debugged", "FALSE")
                            .with("pmiverbose", "FALSE");
                        send(out, cid, m);
                    }
                    Err(e) => self.reject(cid, &msg, "fullinit-response", &e, out),
                }
                return;
            }
            _ => {}
        }
        let Some(rank) = rank else {
            let e = format!("command {:?} before initack/fullinit", msg.cmd);
            out.push(Output::Event(Event::ProtocolError {
                rank: None,
                error: e,
            }));
            self.close(cid, out);
            return;
        };
        self.mark_active(rank, out);
        match msg.wire {
            Wire::V1 => self.handle_v1(cid, rank, msg, out),
            Wire::V2 => self.handle_v2(cid, rank, msg, out),
        }
    }

    fn reject(&mut self, cid: ConnId, msg: &Message, cmd: &str, e: &str, out: &mut Vec<Output>) {
        let rank = self.rank_of(cid);
        send(out, cid, error_reply(msg, cmd, e));
        out.push(Output::Event(Event::ProtocolError {
            rank,
            error: e.to_owned(),
        }));
    }

    fn appnum(&self, rank: u32) -> u32 {
        self.config
            .appnum_of_rank
            .get(rank as usize)
            .copied()
            .unwrap_or(0)
    }

    fn universe(&self) -> u32 {
        self.config.universe_size.unwrap_or(self.size)
    }

    /// Job attributes: what `get` of a `PMI_` key and `info-getjobattr` answer.
    fn job_attr(&self, key: &str) -> Option<String> {
        match key {
            "PMI_process_mapping" if !self.mapping.is_empty() => Some(self.mapping.clone()),
            "universeSize" | "PMI_universe_size" => Some(self.universe().to_string()),
            _ => None,
        }
    }

    fn handle_v1(&mut self, cid: ConnId, rank: u32, msg: Message, out: &mut Vec<Output>) {
        let ok = |name: &str| reply(&msg, name).with("rc", "0");
        match msg.cmd.as_str() {
            "get_maxes" => send(
                out,
                cid,
                ok("maxes")
                    .with("kvsname_max", KVSNAME_MAX.to_string())
                    .with("keylen_max", KEYLEN_MAX.to_string())
                    .with("vallen_max", VALLEN_MAX.to_string()),
            ),
            "get_appnum" => {
                let m = ok("appnum").with("appnum", self.appnum(rank).to_string());
                send(out, cid, m)
            }
            "get_my_kvsname" => {
                let m = ok("my_kvsname").with("kvsname", &self.config.kvsname);
                send(out, cid, m)
            }
            "get_universe_size" => {
                let m = ok("universe_size").with("size", self.universe().to_string());
                send(out, cid, m)
            }
            "put" => match (msg.get("key"), msg.get("value")) {
                (Some(k), Some(v)) if !k.is_empty() => {
                    self.report.puts += 1;
                    self.kvs.insert(k.to_owned(), v.to_owned());
                    send(out, cid, ok("put_result").with("msg", "success"));
                }
                _ => self.reject(cid, &msg, "put_result", "put without key or value", out),
            },
            "get" => {
                let key = msg.get("key").unwrap_or_default();
                self.report.gets += 1;
                let value = if key.starts_with("PMI_") || key == "universeSize" {
                    self.job_attr(key)
                } else {
                    self.kvs.get(key).cloned()
                };
                let m = match value {
                    Some(v) => ok("get_result")
                        .with("msg", "success")
                        .with("found", "TRUE")
                        .with("value", v),
                    // Old clients test rc, new ones found; "unknown" keeps old parsers happy.
                    None => reply(&msg, "get_result")
                        .with("rc", "-1")
                        .with("msg", format!("key_{key}_not_found"))
                        .with("found", "FALSE")
                        .with("value", "unknown"),
                };
                send(out, cid, m);
            }
            "barrier_in" => self.enter_fence(cid, rank, Pending::Barrier, &msg, out),
            "finalize" => {
                self.finalize(rank, out);
                send(out, cid, ok("finalize_ack"));
            }
            "abort" => self.abort(rank, &msg, out),
            "publish_name" => {
                let m = self.publish(&msg, "publish_result");
                send(out, cid, m)
            }
            "unpublish_name" => {
                let m = self.unpublish(&msg, "unpublish_result");
                send(out, cid, m)
            }
            "lookup_name" => {
                let m = self.lookup(&msg, "lookup_result");
                send(out, cid, m)
            }
            "spawn" => {
                // Old clients send one mcmd block per command and read one reply after the last.
                let last = match (msg.get_int("totspawns"), msg.get_int("spawnssofar")) {
                    (Some(t), Some(s)) => s >= t,
                    _ => true,
                };
                if last {
                    let m = error_reply(
                        &msg,
                        "spawn_result",
                        "MPI_Comm_spawn is not supported by this process manager",
                    );
                    send(out, cid, m);
                }
            }
            other => {
                let e = format!("unknown PMI-1 command {other:?}");
                self.reject(cid, &msg, &format!("{other}_result"), &e, out);
            }
        }
    }

    fn handle_v2(&mut self, cid: ConnId, rank: u32, msg: Message, out: &mut Vec<Output>) {
        let resp = |m: &Message| format!("{}-response", m.cmd);
        let ok = |m: &Message| reply(m, &resp(m)).with("rc", "0");
        match msg.cmd.as_str() {
            "job-getid" => {
                let m = ok(&msg).with("jobid", &self.config.kvsname);
                send(out, cid, m)
            }
            "kvs-put" => match (msg.get("key"), msg.get("value")) {
                (Some(k), Some(v)) if !k.is_empty() => {
                    self.report.puts += 1;
                    self.kvs.insert(k.to_owned(), v.to_owned());
                    send(out, cid, ok(&msg));
                }
                _ => self.reject(cid, &msg, &resp(&msg), "kvs-put without key or value", out),
            },
            "kvs-get" => {
                self.report.gets += 1;
                let value = msg.get("key").and_then(|k| self.kvs.get(k)).cloned();
                let m = found_reply(ok(&msg), value);
                send(out, cid, m)
            }
            "info-getjobattr" => {
                self.report.gets += 1;
                let value = msg.get("key").and_then(|k| self.job_attr(k));
                let m = found_reply(ok(&msg), value);
                send(out, cid, m)
            }
            "kvs-fence" => self.enter_fence(cid, rank, Pending::Fence, &msg, out),
            "info-putnodeattr" => match (msg.get("key"), msg.get("value")) {
                (Some(k), Some(v)) => {
                    let node = self.nodes[rank as usize];
                    self.node_attrs.insert((node, k.to_owned()), v.to_owned());
                    send(out, cid, ok(&msg));
                    self.release_node_waiters(node, k, out);
                }
                _ => self.reject(
                    cid,
                    &msg,
                    &resp(&msg),
                    "info-putnodeattr without key or value",
                    out,
                ),
            },
            "info-getnodeattr" => {
                let node = self.nodes[rank as usize];
                let key = msg.get("key").unwrap_or_default().to_owned();
                let value = self.node_attrs.get(&(node, key.clone())).cloned();
                if value.is_none() && msg.get("wait") == Some("TRUE") {
                    self.node_waiters.push(NodeWaiter {
                        conn: cid,
                        node,
                        key,
                        thrid: msg.get("thrid").map(str::to_owned),
                    });
                } else {
                    let m = found_reply(ok(&msg), value);
                    send(out, cid, m);
                }
            }
            "name-publish" => {
                let m = self.publish(&msg, &resp(&msg));
                send(out, cid, m)
            }
            "name-unpublish" => {
                let m = self.unpublish(&msg, &resp(&msg));
                send(out, cid, m)
            }
            "name-lookup" => {
                let m = self.lookup(&msg, &resp(&msg));
                send(out, cid, m)
            }
            "finalize" => {
                self.finalize(rank, out);
                send(out, cid, ok(&msg));
            }
            "abort" => self.abort(rank, &msg, out),
            "spawn" | "job-connect" | "job-disconnect" => {
                let m = error_reply(
                    &msg,
                    &resp(&msg),
                    &format!("{} is not supported by this process manager", msg.cmd),
                );
                send(out, cid, m)
            }
            other => {
                let e = format!("unknown PMI-2 command {other:?}");
                self.reject(cid, &msg, &resp(&msg), &e, out);
            }
        }
    }

    fn publish(&mut self, msg: &Message, name: &str) -> Message {
        let service = msg.get("service").or_else(|| msg.get("name"));
        match (service, msg.get("port")) {
            (Some(s), Some(p)) if !self.names.contains_key(s) => {
                self.names.insert(s.to_owned(), p.to_owned());
                reply(msg, name).with("rc", "0").with("msg", "success")
            }
            (Some(s), Some(_)) => {
                error_reply(msg, name, &format!("service {s} is already published"))
            }
            _ => error_reply(msg, name, "publish without service name or port"),
        }
    }

    fn unpublish(&mut self, msg: &Message, name: &str) -> Message {
        let service = msg.get("service").or_else(|| msg.get("name"));
        match service.and_then(|s| self.names.remove(s)) {
            Some(_) => reply(msg, name).with("rc", "0").with("msg", "success"),
            None => error_reply(msg, name, "service is not published"),
        }
    }

    fn lookup(&self, msg: &Message, name: &str) -> Message {
        let service = msg.get("service").or_else(|| msg.get("name"));
        match service.and_then(|s| self.names.get(s)) {
            Some(p) => {
                let mut m = reply(msg, name).with("rc", "0").with("port", p);
                if msg.wire == Wire::V2 {
                    m = m.with("found", "TRUE").with("value", p);
                }
                m
            }
            None => error_reply(msg, name, "service is not published"),
        }
    }

    fn release_node_waiters(&mut self, node: u32, key: &str, out: &mut Vec<Output>) {
        let Some(value) = self.node_attrs.get(&(node, key.to_owned())).cloned() else {
            return;
        };
        let (ready, rest): (Vec<_>, Vec<_>) = std::mem::take(&mut self.node_waiters)
            .into_iter()
            .partition(|w| w.node == node && w.key == key);
        self.node_waiters = rest;
        for w in ready {
            let mut m = Message::new(Wire::V2, "info-getnodeattr-response");
            if let Some(t) = &w.thrid {
                m.push("thrid", t);
            }
            let m = m
                .with("rc", "0")
                .with("found", "TRUE")
                .with("value", &value);
            send(out, w.conn, m);
        }
    }
}

/// A get's reply: the value when found.
fn found_reply(m: Message, value: Option<String>) -> Message {
    match value {
        Some(v) => m.with("found", "TRUE").with("value", v),
        None => m.with("found", "FALSE"),
    }
}
