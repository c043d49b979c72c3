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
  prefetch = nil,                     -- "auto" | "always" | "never": start a suggestion as keys arrive, and read
                                      -- the text where insert mode starts (nil: auto, on with 0.12 inline
                                      -- completion, off for the 0.11 popup; "always" turns it on there)
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

-- Entering insert mode is told to the server (codellm/cursor, where the cursor then is), which reads the
-- prompt there before the first key is typed: the first suggestion at a new place then costs no more than
-- the next. (Not on normal-mode moves: the cursor sits on a character there, and `a`, `A` or `o` start
-- typing elsewhere.) Typing needs none: the server reads the cursor from the edit.
local function tell_insert_starts(client, bufnr)
  local group = vim.api.nvim_create_augroup("codellm_cursor_" .. bufnr, { clear = true })
  vim.api.nvim_create_autocmd("InsertEnter", {
    group = group,
    buffer = bufnr,
    callback = function()
      vim.schedule(function() -- once `a`, `A` or `o` has put the cursor where typing starts
        if client:is_stopped() or vim.api.nvim_get_current_buf() ~= bufnr or vim.fn.mode() ~= "i" then
          return
        end
        client:notify("codellm/cursor", vim.lsp.util.make_position_params(0, client.offset_encoding))
      end)
    end,
  })
  vim.api.nvim_create_autocmd("LspDetach", {
    group = group,
    buffer = bufnr,
    callback = function(args)
      if args.data.client_id == client.id then
        vim.api.nvim_del_augroup_by_id(group)
      end
    end,
  })
end

local function on_attach(client, bufnr)
  tell_insert_starts(client, bufnr)
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
