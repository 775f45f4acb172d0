-- A discard S3 sink for benchmarks: accepts path-style S3 requests, reads every body (so the bytes really
-- cross the wire), counts objects and bytes, keeps only per-object metadata (size, ETag, x-amz-meta-*)
-- in a shared dict, and answers with plausible S3 XML. Signatures are not checked.
--
-- Verification: the CRC-32 of every body is computed here (zlib's crc32 through LuaJIT's FFI, ~3 GB/s a
-- core; nginx's own ngx.crc32_long as a fallback) and kept per object, or per part for a multipart
-- upload; GET /_sink/crc?prefix=BUCKET/PREFIX/ lists them, and the benchmark compares them with the CRC-32
-- of the source files after each run, so no tool's figure counts a damaged upload. Every client pays the
-- same sink CPU for it.
--
-- Integrity headers: per data request (PUT with a body) the sink counts what the client declared:
-- Content-MD5 ("md5"), x-amz-checksum-ALGO ("ALGO"), a payload SHA-256 in x-amz-content-sha256 ("sha256";
-- "unsigned" for UNSIGNED-PAYLOAD, "streaming" for aws-chunked), x-amz-trailer ("trailer"). The counters are
-- "hdr:NAME" in /_sink/stats, so the benchmark shows next to every figure what work each client did.
--
-- ETags: a single PUT or UploadPart gets the MD5 the client declared (Content-MD5, else rclone's
-- x-amz-meta-md5chksum), or a made-up one when the client declared none; CompleteMultipartUpload answers
-- md5(concat part md5s)-N from the part ETags the client lists, as S3 does.
--
-- Control: GET /_sink/stats -> JSON counters; GET /_sink/crc?prefix=P -> JSON {path: "crc:size,..."};
-- POST /_sink/reset -> forget everything.

local objs = ngx.shared.sink_objs     -- "bucket/key" -> "size\tetag\tmeta-json"
local stats = ngx.shared.sink_stats   -- counters
local parts = ngx.shared.sink_parts   -- "uploadId\tpart" -> "size\tetag\tcrc" ; "uploadId" -> "bucket/key\tmeta"
local crcs = ngx.shared.sink_crc      -- "bucket/key" -> "crc:size" (single PUT) or "crc:size,crc:size,..." (parts)

local crc32
do
    local ok, ffi = pcall(require, "ffi")
    if ok then
        ok = pcall(ffi.cdef, "unsigned long crc32(unsigned long crc, const char *buf, unsigned int len);")
        if ok then
            ok = pcall(function() return ffi.C.crc32 end)
        end
    end
    if ok then
        local C = ffi.C
        crc32 = function(data)
            local crc, pos, n = 0, 0, #data
            while pos < n do  -- zlib takes at most 4 GiB a call
                local len = math.min(n - pos, 1073741824)
                crc = C.crc32(crc, ffi.cast("const char *", data) + pos, len)
                pos = pos + len
            end
            return tonumber(crc)
        end
    else
        crc32 = function(data) return ngx.crc32_long(data) end
    end
end

local XMLNS = 'xmlns="http://s3.amazonaws.com/doc/2006-03-01/"'

local function hex(bin)
    return (bin:gsub(".", function(c) return string.format("%02x", string.byte(c)) end))
end

local function unhex(h)
    return (h:gsub("%x%x", function(x) return string.char(tonumber(x, 16)) end))
end

local function xml_escape(s)
    return (s:gsub("&", "&amp;"):gsub("<", "&lt;"):gsub(">", "&gt;"):gsub('"', "&quot;"))
end

local function send_xml(status, body)
    ngx.status = status
    ngx.header["Content-Type"] = "application/xml"
    ngx.header["Content-Length"] = #body
    ngx.print(body)
    return ngx.exit(status)
end

local function s3_error(status, code, message)
    return send_xml(status, '<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>' .. code ..
        '</Code><Message>' .. xml_escape(message) .. '</Message><RequestId>sink</RequestId></Error>')
end

local function iso_now()
    return ngx.utctime():gsub(" ", "T") .. ".000Z"
end

local function count_integrity(h)
    if h["content-md5"] then stats:incr("hdr:md5", 1, 0) end
    for k, _ in pairs(h) do
        local algo = k:match("^x%-amz%-checksum%-(%w+)$")
        if algo and algo ~= "mode" and algo ~= "type" and algo ~= "algorithm" then
            stats:incr("hdr:" .. algo, 1, 0)
        end
    end
    local sha = h["x-amz-content-sha256"] or ""
    if sha:match("^%x+$") and #sha == 64 then stats:incr("hdr:sha256", 1, 0)
    elseif sha == "UNSIGNED-PAYLOAD" then stats:incr("hdr:unsigned", 1, 0)
    elseif sha:sub(1, 9) == "STREAMING" then stats:incr("hdr:streaming", 1, 0) end
    if h["x-amz-trailer"] then stats:incr("hdr:trailer", 1, 0) end
    stats:incr("hdr:requests", 1, 0)
end

-- the payload of an aws-chunked body ("hex[;ext]\r\n<data>\r\n ... 0\r\n<trailers>\r\n\r\n")
local function dechunk(data)
    local out, pos = {}, 1
    while true do
        local eol = data:find("\r\n", pos, true)
        if not eol then break end
        local n = tonumber(data:sub(pos, eol - 1):match("^(%x+)") or "", 16)
        if not n or n == 0 then break end
        out[#out + 1] = data:sub(eol + 2, eol + 1 + n)
        pos = eol + 2 + n + 2
    end
    return table.concat(out)
end

-- Read the request body; returns the number of payload bytes, the headers and the payload's CRC-32 (hex).
local function consume_body()
    ngx.req.read_body()
    local h = ngx.req.get_headers()
    local data = ngx.req.get_body_data()
    if not data then
        local f = ngx.req.get_body_file()
        data = ""
        if f then
            local fh = io.open(f, "rb")
            if fh then data = fh:read("*a") or ""; fh:close() end
        end
    end
    local wire = #data
    count_integrity(h)
    -- aws-chunked bodies (botocore checksums in trailers) carry framing; the object is the decoded length.
    local decoded = tonumber(h["x-amz-decoded-content-length"] or "")
    if decoded then data = dechunk(data) end
    local size = decoded or wire
    stats:incr("wire_bytes", wire, 0)
    return size, h, string.format("%08x", crc32(data))
end

local function declared_md5(h)
    local b64 = h["content-md5"] or h["x-amz-meta-md5chksum"]
    if b64 then
        local bin = ngx.decode_base64(b64)
        if bin and #bin == 16 then return hex(bin) end
    end
    return nil
end

local function meta_of(h)
    local meta = {}
    for k, v in pairs(h) do
        if k:sub(1, 11) == "x-amz-meta-" then meta[#meta + 1] = k .. "=" .. ngx.escape_uri(v) end
    end
    return table.concat(meta, "&")
end

local function store(path, size, etag, meta)
    local old = objs:get(path)
    if not old then stats:incr("objects", 1, 0) end
    local ok, err = objs:set(path, size .. "\t" .. etag .. "\t" .. meta)
    if not ok then ngx.log(ngx.ERR, "sink_objs full: ", err) end
    stats:incr("bytes", size, 0)
end

local function put_object(path)
    local size, h, crc = consume_body()
    local etag = declared_md5(h) or ngx.md5(path .. size)
    store(path, size, etag, meta_of(h))
    crcs:set(path, crc .. ":" .. size)
    stats:incr("puts", 1, 0)
    ngx.header["ETag"] = '"' .. etag .. '"'
    ngx.header["Content-Length"] = 0
    return ngx.exit(200)
end

local function upload_part(upload_id, number)
    if not parts:get(upload_id) then
        consume_body()
        return s3_error(404, "NoSuchUpload", "The specified upload does not exist.")
    end
    local size, h, crc = consume_body()
    local etag = declared_md5(h) or ngx.md5(upload_id .. number .. size)
    parts:set(upload_id .. "\t" .. number, size .. "\t" .. etag .. "\t" .. crc)
    stats:incr("parts", 1, 0)
    stats:incr("part_bytes", size, 0)
    ngx.header["ETag"] = '"' .. etag .. '"'
    ngx.header["Content-Length"] = 0
    return ngx.exit(200)
end

local function create_upload(bucket, key, path)
    local id = "sink-" .. stats:incr("uploads", 1, 0) .. "-" .. ngx.worker.pid()
    parts:set(id, path .. "\t" .. meta_of(ngx.req.get_headers()))
    return send_xml(200, '<?xml version="1.0" encoding="UTF-8"?>\n<InitiateMultipartUploadResult ' .. XMLNS ..
        '><Bucket>' .. xml_escape(bucket) .. '</Bucket><Key>' .. xml_escape(key) .. '</Key><UploadId>' .. id ..
        '</UploadId></InitiateMultipartUploadResult>')
end

local function complete_upload(bucket, key, upload_id)
    local head = parts:get(upload_id)
    if not head then return s3_error(404, "NoSuchUpload", "The specified upload does not exist.") end
    ngx.req.read_body()
    local body = ngx.req.get_body_data() or ""
    local md5s, n, size, pieces = {}, 0, 0, {}
    for part in body:gmatch("<Part>(.-)</Part>") do
        local num = part:match("<PartNumber>%s*(%d+)%s*</PartNumber>")
        local etag = part:match("<ETag>(.-)</ETag>") or ""
        -- clients quote the ETag: "..", &quot;..&quot; (boto3), &#34;..&#34; (Go's encoder)
        etag = etag:gsub("&quot;", ""):gsub("&#34;", ""):gsub("&#x22;", ""):gsub('"', ""):gsub("%s", "")
        local rec = parts:get(upload_id .. "\t" .. (num or "?"))
        if not rec then return s3_error(400, "InvalidPart", "part " .. tostring(num) .. " was not uploaded") end
        local psize, petag, pcrc = rec:match("^(%d+)\t(%x+)\t(%x+)$")
        if petag ~= etag:lower() then return s3_error(400, "InvalidPart", "ETag of part " .. num .. " differs") end
        n = n + 1
        pieces[n] = pcrc .. ":" .. psize
        md5s[n] = unhex(petag)
        size = size + tonumber(psize)
        parts:delete(upload_id .. "\t" .. num)
    end
    if n == 0 then return s3_error(400, "MalformedXML", "no parts listed") end
    local etag = ngx.md5(table.concat(md5s)) .. "-" .. n
    local meta = head:match("\t(.*)$") or ""
    parts:delete(upload_id)
    store(bucket .. "/" .. key, size, etag, meta)
    crcs:set(bucket .. "/" .. key, table.concat(pieces, ","))
    stats:incr("completes", 1, 0)
    return send_xml(200, '<?xml version="1.0" encoding="UTF-8"?>\n<CompleteMultipartUploadResult ' .. XMLNS ..
        '><Location>/' .. xml_escape(bucket .. "/" .. key) .. '</Location><Bucket>' .. xml_escape(bucket) ..
        '</Bucket><Key>' .. xml_escape(key) .. '</Key><ETag>&quot;' .. etag ..
        '&quot;</ETag></CompleteMultipartUploadResult>')
end

local function list_parts(bucket, key, upload_id)
    if not parts:get(upload_id) then return s3_error(404, "NoSuchUpload", "The specified upload does not exist.") end
    local out = {}
    for _, k in ipairs(parts:get_keys(0)) do
        local id, num = k:match("^(.-)\t(%d+)$")
        if id == upload_id then
            local psize, petag = parts:get(k):match("^(%d+)\t(%x+)")
            out[#out + 1] = { tonumber(num), psize, petag }
        end
    end
    table.sort(out, function(a, b) return a[1] < b[1] end)
    local xml = { '<?xml version="1.0" encoding="UTF-8"?>\n<ListPartsResult ' .. XMLNS .. '><Bucket>' ..
        xml_escape(bucket) .. '</Bucket><Key>' .. xml_escape(key) .. '</Key><UploadId>' .. upload_id ..
        '</UploadId><MaxParts>1000</MaxParts><IsTruncated>false</IsTruncated>' }
    for _, p in ipairs(out) do
        xml[#xml + 1] = '<Part><PartNumber>' .. p[1] .. '</PartNumber><LastModified>' .. iso_now() ..
            '</LastModified><ETag>&quot;' .. p[3] .. '&quot;</ETag><Size>' .. p[2] .. '</Size></Part>'
    end
    xml[#xml + 1] = '</ListPartsResult>'
    return send_xml(200, table.concat(xml))
end

local function list_objects(bucket, args)
    local prefix = args["prefix"] or ""
    local delim = args["delimiter"]
    if delim == "" then delim = nil end
    local max = tonumber(args["max-keys"] or "1000") or 1000
    if max > 1000 then max = 1000 end
    local after = args["continuation-token"] or args["start-after"] or args["marker"] or ""
    local v2 = args["list-type"] == "2"
    local base = bucket .. "/"
    local keys = {}
    for _, k in ipairs(objs:get_keys(0)) do
        if k:sub(1, #base) == base then
            local key = k:sub(#base + 1)
            if key:sub(1, #prefix) == prefix and key > after then keys[#keys + 1] = key end
        end
    end
    table.sort(keys)
    local contents, prefixes, seen, count, last, truncated = {}, {}, {}, 0, nil, false
    for _, key in ipairs(keys) do
        local rest = key:sub(#prefix + 1)
        local cut = delim and rest:find(delim, 1, true)
        local entry = cut and (prefix .. rest:sub(1, cut + #delim - 1)) or nil
        if not (entry and seen[entry]) then
            if count >= max then truncated = true; break end
            count = count + 1
            if entry then
                seen[entry] = true
                prefixes[#prefixes + 1] = '<CommonPrefixes><Prefix>' .. xml_escape(entry) .. '</Prefix></CommonPrefixes>'
                last = entry .. "\255"
            else
                local size, etag = objs:get(base .. key):match("^(%d+)\t([^\t]*)")
                contents[#contents + 1] = '<Contents><Key>' .. xml_escape(key) .. '</Key><LastModified>' ..
                    iso_now() .. '</LastModified><ETag>&quot;' .. etag .. '&quot;</ETag><Size>' .. size ..
                    '</Size><StorageClass>STANDARD</StorageClass></Contents>'
                last = key
            end
        end
    end
    local xml = { '<?xml version="1.0" encoding="UTF-8"?>\n<ListBucketResult ' .. XMLNS .. '><Name>' ..
        xml_escape(bucket) .. '</Name><Prefix>' .. xml_escape(prefix) .. '</Prefix><MaxKeys>' .. max ..
        '</MaxKeys><KeyCount>' .. count .. '</KeyCount><IsTruncated>' .. tostring(truncated) .. '</IsTruncated>' }
    if delim then xml[#xml + 1] = '<Delimiter>' .. xml_escape(delim) .. '</Delimiter>' end
    if truncated and last then
        if v2 then
            xml[#xml + 1] = '<NextContinuationToken>' .. xml_escape(last) .. '</NextContinuationToken>'
        else
            xml[#xml + 1] = '<NextMarker>' .. xml_escape(last) .. '</NextMarker>'
        end
    end
    xml[#xml + 1] = table.concat(contents)
    xml[#xml + 1] = table.concat(prefixes)
    xml[#xml + 1] = '</ListBucketResult>'
    return send_xml(200, table.concat(xml))
end

local function head_object(path)
    local rec = objs:get(path)
    if not rec then ngx.status = 404; return ngx.exit(404) end
    local size, etag, meta = rec:match("^(%d+)\t([^\t]*)\t(.*)$")
    ngx.header["Content-Length"] = size
    ngx.header["ETag"] = '"' .. etag .. '"'
    ngx.header["Last-Modified"] = ngx.http_time(ngx.time())
    ngx.header["Content-Type"] = "application/octet-stream"
    for pair in meta:gmatch("[^&]+") do
        local k, v = pair:match("^(.-)=(.*)$")
        if k then ngx.header[k] = ngx.unescape_uri(v) end
    end
    return ngx.exit(200)
end

local function control(path)
    if path == "/_sink/crc" then
        local prefix = ngx.req.get_uri_args()["prefix"] or ""
        local out = {}
        for _, k in ipairs(crcs:get_keys(0)) do
            if k:sub(1, #prefix) == prefix then
                out[#out + 1] = '"' .. k:gsub('\\', '\\\\'):gsub('"', '\\"') .. '":"' .. crcs:get(k) .. '"'
            end
        end
        ngx.header["Content-Type"] = "application/json"
        ngx.print("{" .. table.concat(out, ",") .. "}")
        return ngx.exit(200)
    elseif path == "/_sink/stats" then
        local names = { "objects", "bytes", "wire_bytes", "puts", "parts", "part_bytes", "uploads", "completes",
            "requests" }
        for _, k in ipairs(stats:get_keys(0)) do
            if k:sub(1, 4) == "hdr:" then names[#names + 1] = k end
        end
        local out = {}
        for _, n in ipairs(names) do out[#out + 1] = '"' .. n .. '":' .. (stats:get(n) or 0) end
        local body = "{" .. table.concat(out, ",") .. "}"
        ngx.header["Content-Type"] = "application/json"
        ngx.print(body)
        return ngx.exit(200)
    elseif path == "/_sink/reset" then
        objs:flush_all(); objs:flush_expired(); stats:flush_all(); stats:flush_expired()
        parts:flush_all(); parts:flush_expired(); crcs:flush_all(); crcs:flush_expired()
        return ngx.exit(204)
    end
    return s3_error(404, "NoSuchKey", "unknown control path")
end

-- dispatch ------------------------------------------------------------------------------------------
local method = ngx.req.get_method()
local uri = ngx.var.uri
if uri:sub(1, 7) == "/_sink/" then return control(uri) end
stats:incr("requests", 1, 0)
local args = ngx.req.get_uri_args()
local bucket, key = uri:match("^/([^/]+)/(.+)$")
if not bucket then bucket = uri:match("^/([^/]+)/?$") end

if not bucket then  -- service level: ListBuckets
    return send_xml(200, '<?xml version="1.0" encoding="UTF-8"?>\n<ListAllMyBucketsResult ' .. XMLNS ..
        '><Owner><ID>sink</ID></Owner><Buckets/></ListAllMyBucketsResult>')
end

if not key then
    if method == "HEAD" or method == "PUT" then return ngx.exit(200) end
    if args["location"] ~= nil then
        return send_xml(200, '<?xml version="1.0" encoding="UTF-8"?>\n<LocationConstraint ' .. XMLNS ..
            '></LocationConstraint>')
    end
    if args["uploads"] ~= nil then
        return send_xml(200, '<?xml version="1.0" encoding="UTF-8"?>\n<ListMultipartUploadsResult ' .. XMLNS ..
            '><Bucket>' .. xml_escape(bucket) .. '</Bucket><IsTruncated>false</IsTruncated></ListMultipartUploadsResult>')
    end
    if method == "GET" then return list_objects(bucket, args) end
    if method == "POST" and args["delete"] ~= nil then  -- DeleteObjects (benchmark cleanup)
        ngx.req.read_body()
        local body = ngx.req.get_body_data() or ""
        for key in body:gmatch("<Key>(.-)</Key>") do
            key = key:gsub("&lt;", "<"):gsub("&gt;", ">"):gsub("&quot;", '"'):gsub("&amp;", "&")
            if objs:get(bucket .. "/" .. key) then
                objs:delete(bucket .. "/" .. key); crcs:delete(bucket .. "/" .. key)
                stats:incr("objects", -1, 0)
            end
        end
        return send_xml(200, '<?xml version="1.0" encoding="UTF-8"?>\n<DeleteResult ' .. XMLNS .. '></DeleteResult>')
    end
    return s3_error(405, "MethodNotAllowed", method .. " on a bucket")
end

local path = bucket .. "/" .. key
local upload_id = args["uploadId"]
if method == "PUT" then
    if upload_id then return upload_part(upload_id, tonumber(args["partNumber"]) or 0) end
    return put_object(path)
elseif method == "POST" then
    if args["uploads"] ~= nil then return create_upload(bucket, key, path) end
    if upload_id then return complete_upload(bucket, key, upload_id) end
elseif method == "HEAD" then
    return head_object(path)
elseif method == "DELETE" then
    if upload_id then parts:delete(upload_id); return ngx.exit(204) end
    if objs:get(path) then objs:delete(path); crcs:delete(path); stats:incr("objects", -1, 0) end
    return ngx.exit(204)
elseif method == "GET" then
    if upload_id then return list_parts(bucket, key, upload_id) end
    if objs:get(path) then return s3_error(501, "NotImplemented", "the sink keeps no object data") end
    return s3_error(404, "NoSuchKey", "The specified key does not exist.")
end
return s3_error(405, "MethodNotAllowed", method)
