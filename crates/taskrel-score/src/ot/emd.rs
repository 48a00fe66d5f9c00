//! Exact optimal transport (earth mover's distance) by the primal network simplex method on
//! the bipartite transportation graph.
//!
//! Problem: minimise `sum_ij C_ij x_ij` subject to `sum_j x_ij = a_i`, `sum_i x_ij = b_j`,
//! `x >= 0`, with `C` dense `(n, m)` row-major and `sum a = sum b` (checked to a relative 1e-9,
//! then `b` is rescaled to sum exactly to `sum a`).
//!
//! The basis is a spanning tree of the `n + m` nodes (sources `0..n`, sinks `n..n+m`), stored
//! as parent pointers with depths, children as doubly linked sibling lists (constant-time
//! relinking, subtrees walked without a stack), the flow of each tree edge at its child, and
//! node potentials `u` (sources) and `v` (sinks) with `C_ij = u_i + v_j` on tree edges. The
//! start is the north-west-corner staircase (a spanning tree by construction) with the sinks
//! ordered by a greedy nearest-neighbour matching. Entering arcs are priced by block search
//! (blocks of about `sqrt(n m)` arcs scanned cyclically, the most negative reduced cost of the
//! first block that has one enters, the first such arc on ties; each run of a block along one
//! row is priced in eight vector lanes, compiled for the CPU's vector width at run time, which
//! choose exactly the arc an ordered scan would), the cycle is found by
//! walking both ends up to their common ancestor, and the detached subtree is re-rooted at the
//! entering arc with its potentials shifted by the entering reduced cost.

use crate::{Error, Result};

/// An optimal transport plan in sparse form.
#[derive(Clone, Debug, PartialEq)]
pub struct Plan {
    /// `sum_ij C_ij x_ij`.
    pub cost: f64,
    /// Basic arcs `(i, j, x_ij)`; arcs not listed carry no mass (zero-mass basic arcs are
    /// dropped).
    pub flows: Vec<(u32, u32, f64)>,
    /// Simplex pivots performed.
    pub pivots: usize,
}

impl Plan {
    /// Row sums `(n)` of the plan.
    pub fn row_sums(&self, n: usize) -> Vec<f64> {
        let mut s = vec![0.0; n];
        for &(i, _, x) in &self.flows {
            s[i as usize] += x;
        }
        s
    }

    /// Column sums `(m)` of the plan.
    pub fn col_sums(&self, m: usize) -> Vec<f64> {
        let mut s = vec![0.0; m];
        for &(_, j, x) in &self.flows {
            s[j as usize] += x;
        }
        s
    }
}

/// Checks weights: finite, non-negative, equal totals.
pub(crate) fn check_marginals(a: &[f64], b: &[f64]) -> Result<(f64, f64)> {
    for (name, w) in [("source", a), ("target", b)] {
        if w.is_empty() {
            return Err(Error::Invalid(format!(
                "optimal transport: {name} weights are empty"
            )));
        }
        if let Some(bad) = w.iter().position(|x| !(x.is_finite() && *x >= 0.0)) {
            return Err(Error::Invalid(format!(
                "optimal transport: {name} weight {bad} is {}",
                w[bad]
            )));
        }
    }
    let (sa, sb): (f64, f64) = (a.iter().sum(), b.iter().sum());
    if sa.partial_cmp(&0.0) != Some(std::cmp::Ordering::Greater) || ((sa - sb) / sa).abs() > 1e-9 {
        return Err(Error::Invalid(format!(
            "optimal transport: weights sum to {sa} and {sb}, expected equal positive totals"
        )));
    }
    Ok((sa, sb))
}

/// Solves the transportation problem exactly. `cost` is `(a.len(), b.len())` row-major.
pub fn emd(a: &[f64], b: &[f64], cost: &[f64]) -> Result<Plan> {
    let (n, m) = (a.len(), b.len());
    let (sa, sb) = check_marginals(a, b)?;
    if cost.len() != n * m {
        return Err(Error::Invalid(format!(
            "optimal transport: cost has {} entries, expected {n} x {m}",
            cost.len()
        )));
    }
    if let Some(bad) = cost.iter().position(|c| !c.is_finite()) {
        return Err(Error::Invalid(format!(
            "optimal transport: cost ({}, {}) is {}",
            bad / m,
            bad % m,
            cost[bad]
        )));
    }
    let b: Vec<f64> = b.iter().map(|x| x * sa / sb).collect();
    let mut s = Simplex::new(n, m, cost);
    s.north_west_corner(a, &b);
    s.solve();
    Ok(s.plan())
}

struct Simplex<'c> {
    n: usize,
    m: usize,
    cost: &'c [f64],
    parent: Vec<usize>,
    depth: Vec<u32>,
    flow: Vec<f64>,
    // Children of a node: `first_child`, then `next_sibling` links (`prev_sibling` back).
    first_child: Vec<usize>,
    next_sibling: Vec<usize>,
    prev_sibling: Vec<usize>,
    pot: Vec<f64>,
    pivots: usize,
    eps: f64,
    // Scratch space of `pivot`, kept between pivots.
    up_snk: Vec<usize>,
    up_src: Vec<usize>,
}

const NONE: usize = usize::MAX;

struct Solve<'s, 'c>(&'s mut Simplex<'c>);

impl pulp::NullaryFnOnce for Solve<'_, '_> {
    type Output = ();

    #[inline(always)]
    fn call(self) {
        self.0.solve_body();
    }
}

/// Prices the arcs `first..first + costs.len()` of one row (`costs` and the sinks' potentials
/// `v` side by side, the row's potential `ui`): `best` becomes the most negative reduced cost
/// `c - ui - v_j` below it and its arc, the first such arc on ties, exactly as a scan in order
/// would leave it. Eight lanes keep their own minimum (the loop vectorises), then merge.
#[inline(always)]
fn price_run(costs: &[f64], v: &[f64], ui: f64, first: usize, best: &mut (f64, usize)) {
    const L: usize = 8;
    let mut value = [best.0; L];
    let mut arc = [NONE; L];
    let (cost_chunks, v_chunks) = (costs.chunks_exact(L), v.chunks_exact(L));
    let (cost_tail, v_tail) = (cost_chunks.remainder(), v_chunks.remainder());
    for (c, (cs, vs)) in cost_chunks.zip(v_chunks).enumerate() {
        for l in 0..L {
            let rc = cs[l] - ui - vs[l];
            let better = rc < value[l];
            value[l] = if better { rc } else { value[l] };
            arc[l] = if better { c * L + l } else { arc[l] };
        }
    }
    // Lanes that improved hold values below `best.0`; the smallest wins, the lowest arc on ties.
    for l in 0..L {
        if arc[l] != NONE && (value[l] < best.0 || (value[l] == best.0 && first + arc[l] < best.1))
        {
            *best = (value[l], first + arc[l]);
        }
    }
    let tail_start = costs.len() - cost_tail.len();
    for (q, (&c, &vj)) in cost_tail.iter().zip(v_tail).enumerate() {
        let rc = c - ui - vj;
        if rc < best.0 {
            *best = (rc, first + tail_start + q);
        }
    }
}

impl<'c> Simplex<'c> {
    fn new(n: usize, m: usize, cost: &'c [f64]) -> Self {
        let scale = cost
            .iter()
            .fold(0.0f64, |acc, c| acc.max(c.abs()))
            .max(1e-300);
        Self {
            n,
            m,
            cost,
            parent: vec![NONE; n + m],
            depth: vec![0; n + m],
            flow: vec![0.0; n + m],
            first_child: vec![NONE; n + m],
            next_sibling: vec![NONE; n + m],
            prev_sibling: vec![NONE; n + m],
            pot: vec![0.0; n + m],
            pivots: 0,
            eps: scale * 1e-12,
            up_snk: Vec::new(),
            up_src: Vec::new(),
        }
    }

    /// Cost of the arc between tree nodes `x` and `y` (one a source, the other a sink).
    fn arc_cost(&self, x: usize, y: usize) -> f64 {
        let (i, j) = if x < self.n {
            (x, y - self.n)
        } else {
            (y, x - self.n)
        };
        self.cost[i * self.m + j]
    }

    /// The starting basis: the north-west-corner staircase over the sources in their order and
    /// the sinks in greedy nearest-neighbour order (each source in turn takes the cheapest sink
    /// not yet taken; sinks left over follow). Any order gives a feasible spanning tree; this
    /// one starts near a good matching, which saves pivots.
    fn north_west_corner(&mut self, a: &[f64], b: &[f64]) {
        let (n, m) = (self.n, self.m);
        let mut taken = vec![false; m];
        let mut order = Vec::with_capacity(m);
        for i in 0..n.min(m) {
            let row = &self.cost[i * m..(i + 1) * m];
            let mut best = (f64::INFINITY, NONE);
            for (j, &c) in row.iter().enumerate() {
                if !taken[j] && c < best.0 {
                    best = (c, j);
                }
            }
            if best.1 == NONE {
                break;
            }
            taken[best.1] = true;
            order.push(best.1);
        }
        order.extend((0..m).filter(|&j| !taken[j]));
        let mut adjacency: Vec<Vec<(usize, f64)>> = vec![Vec::new(); n + m];
        let (mut i, mut q) = (0, 0);
        let (mut ra, mut rb) = (a[0], b[order[0]]);
        loop {
            let j = order[q];
            let x = ra.min(rb).max(0.0);
            adjacency[i].push((n + j, x));
            adjacency[n + j].push((i, x));
            ra -= x;
            rb -= x;
            if i == n - 1 && q == m - 1 {
                break;
            }
            if q == m - 1 || (i < n - 1 && ra <= rb) {
                i += 1;
                ra = a[i];
            } else {
                q += 1;
                rb = b[order[q]];
            }
        }
        // Root the staircase at source 0.
        let mut stack = vec![0usize];
        self.parent[0] = 0;
        while let Some(x) = stack.pop() {
            for &(y, f) in &adjacency[x] {
                if self.parent[y] == NONE {
                    self.parent[y] = x;
                    self.depth[y] = self.depth[x] + 1;
                    self.flow[y] = f;
                    self.link(x, y);
                    self.pot[y] = self.arc_cost(x, y) - self.pot[x];
                    stack.push(y);
                }
            }
        }
    }

    fn solve(&mut self) {
        // Compiled for the widest vector instructions this CPU has, chosen at run time (the
        // pricing loop vectorises; no arithmetic changes, so neither does any pivot).
        pulp::Arch::new().dispatch(Solve(self));
    }

    #[inline(always)]
    fn solve_body(&mut self) {
        let (n, m) = (self.n, self.m);
        let arcs = n * m;
        let block = ((arcs as f64).sqrt().ceil() as usize).max(10).min(arcs);
        // The next arc to price, as its (row, column); a block is scanned as runs of
        // consecutive arcs within one row.
        let (mut row, mut col) = (0usize, 0usize);
        loop {
            // Block search for an entering arc.
            let (u, v) = self.pot.split_at(n);
            let mut best = (-self.eps, NONE);
            let mut scanned = 0;
            while scanned < arcs {
                let end = (scanned + block).min(arcs);
                while scanned < end {
                    let run = (end - scanned).min(m - col);
                    let first = row * m + col;
                    price_run(
                        &self.cost[first..first + run],
                        &v[col..col + run],
                        u[row],
                        first,
                        &mut best,
                    );
                    scanned += run;
                    col += run;
                    if col == m {
                        col = 0;
                        row = if row + 1 == n { 0 } else { row + 1 };
                    }
                }
                if best.1 != NONE {
                    break;
                }
            }
            if best.1 == NONE {
                return;
            }
            let (i, j) = (best.1 / m, best.1 % m);
            self.pivot(i, n + j, best.0);
        }
    }

    /// Makes `c` the first child of `p`.
    fn link(&mut self, p: usize, c: usize) {
        let old = self.first_child[p];
        self.next_sibling[c] = old;
        self.prev_sibling[c] = NONE;
        if old != NONE {
            self.prev_sibling[old] = c;
        }
        self.first_child[p] = c;
    }

    /// Removes `c` from the children of `p`.
    fn unlink(&mut self, p: usize, c: usize) {
        let (prev, next) = (self.prev_sibling[c], self.next_sibling[c]);
        if prev == NONE {
            self.first_child[p] = next;
        } else {
            self.next_sibling[prev] = next;
        }
        if next != NONE {
            self.prev_sibling[next] = prev;
        }
    }

    fn pivot(&mut self, src: usize, snk: usize, rc: f64) {
        self.pivots += 1;
        // Walk both ends to the common ancestor. The cycle is src -> snk (entering arc, flow
        // up), then snk up to the ancestor and down to src. Going up from snk, an edge whose
        // child is a sink is traversed against its direction (flow down); going down to src,
        // an edge whose child is a source is traversed against its direction.
        let (mut x, mut y) = (snk, src);
        let mut up_snk = std::mem::take(&mut self.up_snk);
        let mut up_src = std::mem::take(&mut self.up_src);
        up_snk.clear();
        up_src.clear();
        while x != y {
            if self.depth[x] >= self.depth[y] {
                up_snk.push(x);
                x = self.parent[x];
            } else {
                up_src.push(y);
                y = self.parent[y];
            }
        }
        let n_sources = self.n;
        let is_sink = |v: usize| v >= n_sources;
        // Leaving edge: smallest flow among edges whose flow goes down; ties keep the first
        // met along the cycle from the entering arc.
        let mut theta = f64::INFINITY;
        let mut leave = NONE;
        let mut leave_on_src_side = false;
        for &c in &up_snk {
            if is_sink(c) && self.flow[c] < theta {
                theta = self.flow[c];
                leave = c;
            }
        }
        for &c in up_src.iter().rev() {
            if !is_sink(c) && self.flow[c] < theta {
                theta = self.flow[c];
                leave = c;
                leave_on_src_side = true;
            }
        }
        for &c in &up_snk {
            self.flow[c] += if is_sink(c) { -theta } else { theta };
        }
        for &c in &up_src {
            self.flow[c] += if is_sink(c) { theta } else { -theta };
        }
        // Re-root the detached subtree at the entering arc's end on its side.
        let (start, new_parent, path) = if leave_on_src_side {
            (src, snk, &up_src)
        } else {
            (snk, src, &up_snk)
        };
        let stop = path
            .iter()
            .position(|&c| c == leave)
            .unwrap_or(path.len().saturating_sub(1));
        let chain = &path[..=stop];
        // Detach `leave` from its parent.
        let old_parent = self.parent[leave];
        self.unlink(old_parent, leave);
        // Reverse the chain start = chain[0] .. chain[stop] = leave.
        for t in (1..chain.len()).rev() {
            let (child, par) = (chain[t], chain[t - 1]);
            // Edge (chain[t-1], chain[t]) was stored at chain[t-1]; its child becomes chain[t].
            self.unlink(child, par);
            self.link(par, child);
            self.parent[child] = par;
            self.flow[child] = self.flow[par];
        }
        self.parent[start] = new_parent;
        self.link(new_parent, start);
        self.flow[start] = theta;
        // Potentials and depths of the moved subtree, walked in preorder along the sibling links.
        let mut v = start;
        'walk: loop {
            self.depth[v] = self.depth[self.parent[v]] + 1;
            // Sources on the moved side gain rc when it is src's side, lose it otherwise.
            let delta = match (leave_on_src_side, is_sink(v)) {
                (true, false) | (false, true) => rc,
                (true, true) | (false, false) => -rc,
            };
            self.pot[v] += delta;
            if self.first_child[v] != NONE {
                v = self.first_child[v];
                continue;
            }
            loop {
                if v == start {
                    break 'walk;
                }
                if self.next_sibling[v] != NONE {
                    v = self.next_sibling[v];
                    break;
                }
                v = self.parent[v];
            }
        }
        self.up_snk = up_snk;
        self.up_src = up_src;
    }

    fn plan(&self) -> Plan {
        let mut flows = Vec::with_capacity(self.n + self.m);
        let mut cost = 0.0;
        for v in 0..self.n + self.m {
            let p = self.parent[v];
            if p == v || p == NONE || self.flow[v] <= 0.0 {
                continue;
            }
            let (i, j) = if v < self.n {
                (v, p - self.n)
            } else {
                (p, v - self.n)
            };
            cost += self.flow[v] * self.cost[i * self.m + j];
            flows.push((i as u32, j as u32, self.flow[v]));
        }
        flows.sort_by_key(|&(i, j, _)| (i, j));
        Plan {
            cost,
            flows,
            pivots: self.pivots,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dense::Lcg;

    /// The scan in arc order that `price_run` must reproduce: strictly better replaces.
    fn scan(costs: &[f64], v: &[f64], ui: f64, first: usize, best: &mut (f64, usize)) {
        for (q, (&c, &vj)) in costs.iter().zip(v).enumerate() {
            let rc = c - ui - vj;
            if rc < best.0 {
                *best = (rc, first + q);
            }
        }
    }

    #[test]
    fn lane_pricing_picks_the_arc_an_ordered_scan_picks() {
        let mut rng = Lcg(11);
        for len in [0, 1, 7, 8, 9, 16, 23, 64, 81] {
            for trial in 0..50 {
                // Values on a coarse grid, so that equal reduced costs (ties) are common.
                let costs: Vec<f64> = (0..len).map(|_| (rng.next() * 4.0).round()).collect();
                let v: Vec<f64> = (0..len).map(|_| (rng.next() * 2.0).round()).collect();
                let ui = (rng.next() * 2.0).round();
                let start = if trial % 2 == 0 {
                    (-1e-9, NONE)
                } else {
                    (-2.0, 3)
                };
                let (mut want, mut got) = (start, start);
                scan(&costs, &v, ui, 100, &mut want);
                price_run(&costs, &v, ui, 100, &mut got);
                assert_eq!(got, want, "len {len}, trial {trial}");
            }
        }
    }
}
