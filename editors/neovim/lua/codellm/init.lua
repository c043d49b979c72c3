-- codellm for Neovim: starts `codellm-serve` for shell buffers through vim.lsp.config / vim.lsp.enable.
-- Neovim 0.12+: ghost text through vim.lsp.inline_completion. Neovim 0.11: popup items through
-- vim.lsp.completion (the server sends them to clients without inline completion).
local M = {}

M.defaults = {
  cmd = { "codellm-serve" },          -- the server command; add "--model", PATH here or use `model`
  model = nil,                        -- a model bundle directory (e.g. one made by codellm-train)
  device = nil,                       -- "cpu", "cuda" or "mps"; nil: the best available
  threads = nil,                      -- CPU threads for the model
  multiline = "auto",                 -- "auto" | "always" | "never"
  max_tokens = nil,                   -- longest suggestion, in tokens
  min_confidence = nil,               -- 0-1: hide suggestions the model is less sure of (nil: server default)
  cut_confidence = nil,               -- 0-1: end a suggestion before a token less sure than this
  file_context = true,                -- context from sourced files and other open shell buffers
  prefetch = nil,                     -- "auto" | "always" | "never": start a suggestion as keys arrive (nil: auto,
                                      -- on with 0.12 inline completion, off for the 0.11 popup)
  filetypes = { "sh", "bash", "zsh" },
  -- a file's project: the nearest folder above it holding one of these; it is declared to the server as
  -- the workspace folder that sourced files may be read from (file_context). None found: no folder.
  root_markers = { ".git", ".hg", ".svn" },
  autotrigger = true,                 -- ask while typing (0.11 popup); false: only on <C-x><C-o>
}

function M.init_options(config)
  return {
    modelPath = config.model,
    device = config.device,
    threads = config.threads,
    multiline = config.multiline,
    maxTokens = config.max_tokens,
    minConfidence = config.min_confidence,
    cutConfidence = config.cut_confidence,
    fileContext = config.file_context ~= false,
    prefetch = config.prefetch,
  }
end

local function on_attach(client, bufnr)
  if vim.lsp.inline_completion and client:supports_method("textDocument/inlineCompletion") then
    vim.lsp.inline_completion.enable(true, { bufnr = bufnr })
  elseif vim.lsp.completion and client:supports_method("textDocument/completion") then
    vim.lsp.completion.enable(true, client.id, bufnr, { autotrigger = M.config.autotrigger })
  end
end

function M.setup(opts)
  if not (vim.lsp.config and vim.lsp.enable) then
    vim.notify("codellm needs Neovim 0.11 or newer", vim.log.levels.ERROR)
    return
  end
  M.config = vim.tbl_deep_extend("force", vim.deepcopy(M.defaults), opts or {})
  vim.lsp.config("codellm", {
    cmd = M.config.cmd,
    filetypes = M.config.filetypes,
    root_markers = M.config.root_markers,
    init_options = M.init_options(M.config),
    on_attach = on_attach,
  })
  vim.lsp.enable("codellm")
end

return M
