"""
The recurrent transformer block (Kausik, "Scaling Efficient LLMs", arXiv 2402.14746): structure character 'R' in
model.py's structure strings, e.g. "R" (a 1-block recurrent model) or "TRT". One Block is applied over windows of
rec_window tokens, so that the cost per token stays flat as the sequence grows. docs/recurrent.md has the
derivation, the experiment and where this differs from the author's code.
"""
import torch
import torch.nn as nn


class RecurrentBlock(nn.Module):
    """One Block T applied over windows X_0, X_1, ... of w = rec_window tokens, so that its cost grows linearly with
    the length: H_0 = T(X_0); [Y_{k-1}; H_k] = T([H_{k-1} + a_{k-1}; X_k + a_{k-1}]) (causal over 2w positions);
    the last readout Y_last = T(H_last + a_last); a_0 = 0, a_k = alpha * Y_{k-1} (alpha = 0: forget, > 0:
    accumulate). Window k's output is Y_k, and H_k (w vectors) is the state carried on. RoPE positions are local to
    the window, so it runs on any length. Decoding reruns the open window from the last state: O(w) per token.
    docs/recurrent.md has the derivation and where this differs from the author's code."""

    def __init__(self, block, config):
        super().__init__()
        self.block = block  # a model.Block
        self.window = config.rec_window
        self.accumulate = config.rec_alpha > 0 or config.rec_learn_alpha
        self.alpha = nn.Parameter(torch.tensor(config.rec_alpha)) if config.rec_learn_alpha else config.rec_alpha
        self.decoding, self.state, self.pending = False, None, None  # set by SubLLM.setup_cache

    def forward(self, x, rope):
        """x (B, T, C) -> (B, T, C); rope: the (cos, sin) tables. While decoding, x continues the sequence."""
        if not self.decoding:
            return self.recur(x, None, rope)[0]
        inputs = x if self.pending is None else torch.cat([self.pending, x], dim=1)  # (B, j + T, C): the open window
        y, self.state, n_done = self.recur(inputs, self.state, rope)
        self.pending = inputs[:, n_done:]  # inputs of the window still open (fewer than w)
        return y[:, -x.size(1):]

    def recur(self, x, state, rope):
        """The recurrence over x (B, L, C), after the window whose state is `state` ((H, a), or None at the start).
        Returns the outputs at x's positions (B, L, C), the state after x's last complete window, and the number of
        x's tokens in complete windows."""
        w, L = self.window, x.size(1)
        cos, sin = rope[0][None, :2 * w], rope[1][None, :2 * w]  # (1, 2w, D/2): window-local positions
        alpha = self.alpha.clamp(0.0, 1.0) if isinstance(self.alpha, nn.Parameter) else self.alpha
        outputs, done_state, n_done = [], state, 0
        for x_k in x.split(w, dim=1):  # the method's sequential part: one step per window (L/w), not per token
            n = x_k.size(1)  # w, or fewer for the last window
            if state is None:
                h, a = self.block(x_k, cos[:, w:w + n], sin[:, w:w + n]), None  # H_0; a_0 = 0
            else:
                h_prev, a = state
                inp = torch.cat([h_prev, x_k], dim=1)  # (B, w + n, C): [state; new tokens]
                if a is not None:  # accumulate: alpha * the previous readout, added to both halves
                    inp = inp + torch.cat([a, a[:, :n]], dim=1)
                out = self.block(inp, cos[:, :w + n], sin[:, :w + n])  # causal over the w + n positions
                outputs.append(out[:, :w])  # Y of the previous window
                h, a = out[:, w:], alpha * out[:, :w] if self.accumulate else None
            state = (h, a)
            if n == w:
                done_state, n_done = state, n_done + w
        h, a = state
        n = h.size(1)
        outputs.append(self.block(h if a is None else h + a[:, :n], cos[:, :n], sin[:, :n]))  # the last readout
        # a run that continues from a state first re-emits that state window's readout: keep x's positions only
        return torch.cat(outputs, dim=1)[:, -L:], done_state, n_done
